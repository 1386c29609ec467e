"""Distillation methods: one `Method` class each, one module per family, found by name.

    sft.py     sft, seqkd                                 cross-entropy
    logits.py  kd, fdistill_tvd, fdistill_js, minillm     teacher token distributions
    pairs.py   plad_rank, plad_margin, slic, dpo          preference pairs (PLaD and baselines)
    pbkd.py    pbkd_cheap, pbkd_offline, pbkd_online, pbkd_mm   PbKD, trains itself

`base.py` holds the `Method` base class, the registry (`register`, `resolve`, `get`) and the
config check (`configure`). A method of your own: subclass `Method` (or a family's class) in
your module and run it with `--set distill.method=your_module:YourMethod` (README, "Your own
method").
"""

from plad_jax.methods.base import (
    Batches,
    Method,
    NoHParams,
    Setting,
    check_shared_vocabulary,
    configure,
    full_params,
    get,
    knob_keys,
    names,
    register,
    resolve,
)

# Family modules in the order their methods are listed (registration order).
# isort: off
from plad_jax.methods.sft import SFT, SeqKD
from plad_jax.methods.logits import KD, FDistillJS, FDistillTVD, MiniLLM
from plad_jax.methods.pairs import (
    DPO,
    PairHParams,
    PairMethod,
    PladMargin,
    PladRank,
    SLiC,
    pair_forward,
)
from plad_jax.methods.pbkd import PbKD, PbKDCheap, PbKDMM, PbKDOffline, PbKDOnline
# isort: on

__all__ = [
    "Batches",
    "DPO",
    "FDistillJS",
    "FDistillTVD",
    "KD",
    "Method",
    "MiniLLM",
    "NoHParams",
    "Setting",
    "PairHParams",
    "PairMethod",
    "PbKD",
    "PbKDCheap",
    "PbKDMM",
    "PbKDOffline",
    "PbKDOnline",
    "PladMargin",
    "PladRank",
    "SFT",
    "SLiC",
    "SeqKD",
    "check_shared_vocabulary",
    "configure",
    "full_params",
    "get",
    "knob_keys",
    "names",
    "pair_forward",
    "register",
    "resolve",
]
