"""The teacher on its own ranks (--teacher_ranks=K). Of the W ranks torchrun starts, the first S = W - K
hold the student and its optimizer, the last K only the frozen teacher. The students' collectives run
in a process group of their own (train.STUDENTS), so gradients are averaged over the S students only.
Student rank s asks teacher rank S + s % K, with explicit point-to-point calls, for what its
micro-batch's loss needs, and gets back only that (distill.TeacherScores):

    student s                                                teacher S + s % K
    send  [kind, rows, tokens, with_gap, tutored, privilege]  ->  recv
    send  [row ids, completion lengths, completion ids, tutored rows]  ->  recv
                                                             distill.teacher_scores on its own model
    recv  log pi_T(y_t) (N,), then mean entropy, privilege gap  <-  send
    recv  the full rows (N, V) only for a divergence --loss,     <-  send
          and PTD-PO's tutored rows under the hint

A row is named by its place in the pool both sides build the same way: the training samples, then the
exact gap's prompts. A teacher rank answers its students in turn, one request each, since every
student makes the same requests in a step; before that it answers each one until it says `training`
(rank 0 first measures the exact gap), and it stops when all have said `stop`. The paper ran its
teacher this way, on 4 of 8 GPUs (vLLM); verl serves it from a resource pool of its own.
"""

import torch
import torch.distributed as dist

from distill import PRIVILEGES, TeacherScores, teacher_logits, teacher_scores
from model import num_parameters

STOP, SCORES, LOGITS, TRAINING = range(4)   # the kinds of request
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def teacher_of(student_rank, students, world_size):
    return students + student_rank % (world_size - students)


def row_index(pool):
    """{sample id: place in the pool}; ids name rows across processes, so two different samples may
    not share one (user data's gap prompts are its first training samples again: the same ones)."""
    index = {}
    for place, sample in enumerate(pool):
        first = index.setdefault(sample.id, place)
        if first != place and pool[first] is not sample and pool[first] != sample:
            raise SystemExit(f"error: --teacher_ranks names rows by sample id, and '{sample.id}' is the id of two "
                             f"different samples; give every sample its own id")
    return index


class RemoteTeacher:
    """The student's side: the teacher of this rank lives on another rank and answers over send/recv.
    distill.teacher_scores and distill.teacher_logits hand their requests to it."""

    def __init__(self, peer, pool, device):
        self.peer, self.device, self.index = peer, device, row_index(pool)
        shape = self._receive((3,), torch.int64)                      # what the teacher rank loaded
        self.vocab_size, self.num_parameters, dtype = shape.tolist()
        self.dtype = DTYPES[dtype]

    def _receive(self, shape, dtype):
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(tensor, src=self.peer)
        return tensor

    def _ask(self, kind, rows=(), completions=(), privilege="none", with_gap=False, tutored_rows=()):
        lengths = [len(c) for c in completions]
        header = [kind, len(rows), sum(lengths), int(with_gap), len(tutored_rows), PRIVILEGES.index(privilege)]
        dist.send(torch.tensor(header, dtype=torch.int64, device=self.device), dst=self.peer)
        if rows:
            payload = [self.index[row.id] for row in rows] + lengths + [t for c in completions for t in c]
            dist.send(torch.tensor(payload + list(tutored_rows), dtype=torch.int64, device=self.device), dst=self.peer)
        return sum(lengths)

    def remote_scores(self, rows, completions, privilege, config, with_gap, tutored_rows=()):
        tokens = self._ask(SCORES, rows, completions, privilege, with_gap, tutored_rows)
        head = self._receive((tokens + 2,), torch.float64)
        full = (self._receive((tokens, self.vocab_size), self.dtype)
                if config.mode != "ptdpo" and config.loss != "sampled_rkl" else None)
        tutored_tokens = sum(len(completions[i]) for i in tutored_rows)
        tutor = self._receive((tutored_tokens, self.vocab_size), self.dtype) if tutored_tokens else None
        return TeacherScores(head[:tokens].float(), full, tutor, head[tokens].item(), head[tokens + 1].item())

    def remote_logits(self, rows, privilege, completions):
        tokens = self._ask(LOGITS, rows, completions, privilege)
        return self._receive((tokens, self.vocab_size), self.dtype)

    def training(self):
        """Say that this student's requests before training (the exact gap) are over."""
        self._ask(TRAINING)

    def stop(self):
        self._ask(STOP)


def answer(teacher, processor, pool, config, client, device):
    """Receive one request of a student and answer it; -> the request's kind."""
    header = torch.empty(6, dtype=torch.int64, device=device)
    dist.recv(header, src=client)
    kind, num_rows, tokens, with_gap, num_tutored, privilege = header.tolist()
    if kind in (STOP, TRAINING):
        return kind
    payload = torch.empty(2 * num_rows + tokens + num_tutored, dtype=torch.int64, device=device)
    dist.recv(payload, src=client)
    places, lengths, ids, tutored_rows = payload.split([num_rows, num_rows, tokens, num_tutored])
    rows = [pool[i] for i in places.tolist()]
    completions = [c.tolist() for c in ids.split(lengths.tolist())]
    if kind == LOGITS:
        dist.send(teacher_logits(teacher, processor, rows, PRIVILEGES[privilege], completions, config.max_length)
                  .contiguous(), dst=client)
        return kind
    scores = teacher_scores(teacher, processor, rows, completions, PRIVILEGES[privilege], config, bool(with_gap),
                            tutored_rows.tolist())
    # float64 holds the float32 log-probs and the Python floats exactly: the student gets the same numbers
    head = torch.cat([scores.token_logprobs.double(),
                      torch.tensor([scores.entropy, scores.privilege_gap], dtype=torch.float64, device=device)])
    dist.send(head, dst=client)
    for rows_of_v in (scores.logits, scores.tutor_logits):
        if rows_of_v is not None:
            dist.send(rows_of_v.contiguous(), dst=client)
    return kind


def serve(teacher, processor, config, rank, students, world_size, pool, device):
    """A teacher rank's whole run, with the teacher train.load_teacher loaded and the students' processor:
    tell each of its students what it holds, answer each one's requests before training, then all of
    them in turn until each says stop."""
    clients = [s for s in range(students) if teacher_of(s, students, world_size) == rank]
    about = [teacher.lm_head.weight.shape[0], num_parameters(teacher), DTYPES.index(teacher.dtype)]
    for client in clients:
        dist.send(torch.tensor(about, dtype=torch.int64, device=device), dst=client)
    for client in clients:
        while answer(teacher, processor, pool, config, client, device) != TRAINING:
            pass
    active = list(clients)
    while active:
        for client in list(active):
            kind = answer(teacher, processor, pool, config, client, device)
            if kind == STOP:
                active.remove(client)
            elif kind == TRAINING:
                raise RuntimeError(f"teacher rank {rank}: student {client} said `training` twice")
