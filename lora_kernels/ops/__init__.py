"""Registered torch ops (`torch.ops.lora_kernels.*`) with their autograd formulas and public functions.

One file per concern:
    plumbing.py           what every op family needs around its math, written once: the autocast-off runner
                          around `dispatch.select`, the eager autograd.Function and the registered ops' autograd
                          formula, the frozen-base check, the lazy kernels import
    lora_linear.py        the single-adapter family: its implementations per backend, `FAMILY` (what measured
                          dispatch needs), the registered ops, `lora_linear`
    multi_lora.py         the multi-adapter family: the same, plus `lora_shrink` / `lora_expand`
    batch.py              per-step metadata: `LoRABatch` (tokens grouped by adapter slot), `StepDropout`
    multi_lora_checks.py  the multi-adapter argument checks
    multi_lora_torch.py   the multi-adapter "torch" backend
    native.py             fake and autograd registrations of the C++ ops (`lora_kernels._C`)

A new op family is a kernels file (`lora_kernels/kernels/<family>.py`) plus an ops file here that declares its
implementations (a `dispatch.OpFamily`), its registered ops and its public function; nothing else is copied.
"""
