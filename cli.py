"""The command line of every script: --key=value flags into a dataclass, types checked, an unknown key
an error that lists the known ones, and --help printed from the dataclass's own comments.

    config = cli.parse(sys.argv[1:], Config, "python train.py [--key=value ...]", presets=PRESETS)
"""

import dataclasses
import inspect


def help_text(config_class, usage, presets=None, epilog=""):
    """Every field as --name=default, its type and the comment beside it in the dataclass, under the
    dataclass's own group comments; then the presets and the epilog."""
    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(config_class)}
    lines = [f"usage: {usage}", "", "flags (--key=value; a bool flag alone means true):"]
    for line in inspect.getsource(config_class).splitlines()[2:]:
        code, _, comment = line.partition("#")
        name = code.split(":")[0].strip() if ":" in code else None
        if name in types:
            lines.append(f"  --{name}={getattr(config_class, name)!r}".ljust(34) + f" {types[name]:<6} {comment.strip()}")
        elif comment and not code.strip() and line.startswith("    #"):
            lines.append(f"\n {comment.strip()}")                       # a group comment of the dataclass
        elif comment:
            lines.append(" " * 42 + comment.strip())                     # a comment's continuation
    if presets:
        lines += ["", "presets (--preset=NAME applies these before the other flags):"]
        lines += [f"  {name}: " + " ".join(f"--{k}={v}" for k, v in overrides.items())
                  for name, overrides in presets.items()]
    return "\n".join(lines + ([epilog] if epilog else []))


def typed(field, value):
    """The string `value` as the field's type, or a SystemExit that says what was expected."""
    kind = type(field.default)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        return kind(value)
    except ValueError:
        raise SystemExit(f"error: --{field.name} expects a {kind.__name__}, got '{value}'") from None


def parse(argv, config_class, usage, presets=None, epilog="", passthrough=False):
    """argv -> a config_class; --preset=NAME applies a dict of overrides first (the flags win in any
    order). With passthrough, flags the class does not know are returned too, in order, for another
    script: (config, [those flags])."""
    if "--help" in argv or "-h" in argv:
        print(help_text(config_class, usage, presets, epilog))
        raise SystemExit(0)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    overrides, preset, others = {}, {}, []
    for arg in argv:
        if arg.startswith("--") and "=" not in arg and arg[2:] in fields and type(fields[arg[2:]].default) is bool:
            arg += "=true"                                              # --resume means --resume=true
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: expected --key=value, got '{arg}' (--help lists the flags)")
        key, value = arg[2:].split("=", 1)
        if key == "preset" and presets is not None:
            if value not in presets:
                raise SystemExit(f"error: unknown preset '{value}'; known: {sorted(presets)}")
            preset = presets[value]
        elif key in fields:
            overrides[key] = typed(fields[key], value)
        elif passthrough:
            others.append(arg)
        else:
            raise SystemExit(f"error: unknown config key '{key}'; known keys: {', '.join(sorted(fields))}")
    config = config_class(**{**preset, **overrides})
    return (config, others) if passthrough else config
