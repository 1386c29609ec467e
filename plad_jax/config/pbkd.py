"""`PbKDConfig`: the hyper-parameters of PbKD (our reconstruction, METHODS.md section 3).

Kept free of other plad_jax imports so the config tree can hold it without import cycles. The
student's own optimizer settings (batch size, learning rate, warm-up, steps, checkpoints) come
from the distillation `TrainConfig`; these are the method's.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PbKDConfig:
    """PbKD settings; every default is a reasonable starting point, not a tuned value.

    Student (REINFORCE / MM student step):
      num_samples: k student samples per prompt at every step; the leave-one-out baseline needs
          k >= 2.
      temperature: sampling temperature of those samples (1.0 = the policy itself, which the
        score-function estimates assume); max_new_tokens: their length limit.
      beta_kl: weight of `log q - log q_ref` (q_ref = the initial student) in the shaped reward.
      alpha_ce: weight of the CE anchor on the teacher samples (0 = off).
    Adversary (reward model, or Q-network for `pbkd_mm`):
      lam_init, alpha_lam, lam_max, eps: the Lagrange multiplier of the confidence set
        `NLL <= NLL* + eps` and its dual ascent `lam <- clip(lam + alpha_lam (NLL - NLL* - eps), 0,
        lam_max)`. `pbkd_cheap` uses `lam_init` as its fixed DPO weight.
      c_reg: weight of `mean(r^2)`; r_max: rewards (and Q values) are `r_max * tanh(raw / r_max)`.
      rm_warmup_steps: Bradley-Terry steps before the game (each round), whose final NLL over the
        preference set is `NLL*`.
      rm_learning_rate: the adversary's AdamW learning rate (linear decay over the run).
      rm_init: the adversary's backbone; "" = a copy of the initial student (shares its tokenizer,
        reads its samples directly), else a Hugging Face directory with the student's vocabulary.
      head_std: initial std of the RM's scalar head (0 = every reward starts at 0).
    Online (`pbkd_online`):
      rounds: T rounds; the prompts are cut into T chunks, round t samples the current student on
        chunk t, labels those pairs against the teacher's samples and adds them to the set.
    White-box (`pbkd_mm`):
      mm_chunk: positions per block of the vocabulary sums (peak memory ~ chunk x vocabulary).
    Cheap (`pbkd_cheap`):
      dpo_beta: DPO's beta.
    Schedule:
      steps_per_round: alternating steps (one adversary + one student step each) per round;
        0 = the distillation TrainConfig's epochs over the current preference set, capped by its
        max_steps.
    """

    num_samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    beta_kl: float = 0.05
    alpha_ce: float = 0.0
    lam_init: float = 1.0
    alpha_lam: float = 0.1
    lam_max: float = 100.0
    eps: float = 0.05
    c_reg: float = 0.01
    r_max: float = 5.0
    rm_warmup_steps: int = 100
    rm_learning_rate: float = 1e-5
    rm_init: str = ""
    head_std: float = 0.0
    rounds: int = 3
    mm_chunk: int = 128
    dpo_beta: float = 0.1
    steps_per_round: int = 0

    def validate(self):
        """Raise ValueError (one line naming the field) for settings no PbKD variant runs with;
        each variant adds its own checks (`plad_jax.methods.pbkd`)."""
        if (
            self.r_max <= 0
            or self.lam_max < 0
            or self.lam_init < 0
            or self.mm_chunk < 1
            or self.rounds < 1
        ):
            raise ValueError(
                "pbkd r_max must be > 0, lam_init and lam_max >= 0, mm_chunk and rounds >= 1"
            )
        if self.rm_warmup_steps < 0 or self.steps_per_round < 0 or self.max_new_tokens < 1:
            raise ValueError(
                "pbkd rm_warmup_steps and steps_per_round must be >= 0, max_new_tokens >= 1"
            )
