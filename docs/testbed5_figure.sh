#!/bin/bash
# figures/testbed5_opd_budget.png: the training curves of OPD's diagnostics (docs/testbed.md, amendment 5)
python -c "
import tables
runs = {'OPD 2e-5, 160 steps (diag. 3)': '/work/runs/opd_diagnostic', 'OPD 2e-4, 160 steps (4d)': '/work/runs/diag_4d_srkl_2e-4',
        'OPD rkl 2e-4, 160 steps (4c)': '/work/runs/diag_4c_rkl_2e-4', 'OPD 2e-4, 640 steps (4e)': '/work/runs/diag_4e_srkl_640'}
series = {name: {m: tables.step_series([run], m) for m in ['log_ratio', 'reward', 'student_entropy']} for name, run in runs.items()}
tables.draw_curves(series, 'figures/testbed5_opd_budget.png', 'OPD from the base toward its teacher, by budget (docs/testbed.md, amendment 5)')"
