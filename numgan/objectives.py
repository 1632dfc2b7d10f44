"""GAN objectives (spec 1.1; paper Sec. 2.1 and supplement Sec. "Additional experiments", Fig. 9).

The discriminator D returns a logit (no sigmoid). Each player *minimises* its loss;
the paper's utilities are the negated losses (f = -L_G, g = -L_D).
With sp(t) = log(1 + e^t) (softplus):

============  =======================================  ==========================  =========
objective     L_D (discriminator)                      L_G (generator)             zero-sum
============  =======================================  ==========================  =========
standard      mean sp(-D(x_r)) + mean sp(D(x_f))       mean sp(-D(x_f))            no
JS            as standard                              -mean sp(D(x_f))            yes
KL            as standard                              -mean D(x_f)                no
tv            mean tanh D(x_f) - mean tanh D(x_r)      -mean tanh D(x_f)           yes
indicator     mean D(x_f) - mean D(x_r)                -mean D(x_f)                yes
============  =======================================  ==========================  =========

``standard`` is the non-saturating loss of Goodfellow et al. used by the paper's code for every
figure except 6-9 (JS) and 9c (indicator); it is *not* zero-sum (spec D-10).
"""
import torch
import torch.nn.functional as F

OBJECTIVES = ("standard", "JS", "KL", "tv", "indicator")


def _check(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown GAN objective {objective!r}; choose one of {OBJECTIVES}")


def loss_d(d_real: torch.Tensor, d_fake: torch.Tensor, objective: str = "standard") -> torch.Tensor:
    """Discriminator loss L_D from the logits on a real and a fake batch (leading dims averaged)."""
    _check(objective)
    if objective in ("standard", "JS", "KL"):
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if objective == "tv":
        return torch.tanh(d_fake).mean() - torch.tanh(d_real).mean()
    return d_fake.mean() - d_real.mean()  # indicator


def loss_g(d_fake: torch.Tensor, objective: str = "standard") -> torch.Tensor:
    """Generator loss L_G from the discriminator logits on a fake batch."""
    _check(objective)
    if objective == "standard":
        return F.softplus(-d_fake).mean()
    if objective == "JS":
        return -F.softplus(d_fake).mean()
    if objective == "tv":
        return -torch.tanh(d_fake).mean()
    return -d_fake.mean()  # KL and indicator: the raw logit
