"""The last stage's loss path: the policy's response scores, the batch's reference columns and every loss option of
the config reach the pure loss."""

import dataclasses

import torch

from infifpo_mcore.config import LossConfig, load_config
from infifpo_mcore.losses import LossOptions, compute_loss
from infifpo_mcore.train_step import loss_rows, micro_batch_loss

RESPONSES = {"chosen": (torch.tensor([-12.0, -30.0]), torch.tensor([4.0, 6.0])),
             "rejected": (torch.tensor([-15.0, -21.0]), torch.tensor([5.0, 3.0]))}
BATCH = {"reference": {"init_chosen_logps": torch.tensor([-13.0, -28.0]),
                       "init_rejected_logps": torch.tensor([-14.0, -22.0])}}


def test_loss_ipo_tau_reaches_the_loss():
    """Issue #16, 7: losses.py had an ipo_tau that no config key reached."""
    def ipo(*overrides):
        loss = load_config(overrides=["loss.type=ipo", "loss.beta=0.5", "loss.length_norm=false", *overrides]).loss
        return loss_rows(RESPONSES, BATCH, loss, wrpo_alpha=0.0)[0]

    logps = {f"policy_{name}_{kind}": value for name, (sums, lengths) in RESPONSES.items()
             for kind, value in (("logps", sums), ("lengths", lengths))} | BATCH["reference"]
    expected = compute_loss(loss_type="ipo", logps=logps, beta=0.5, length_norm=False, clip=True, fusion="mean",
                            include_pivot_init=False, ipo_tau=0.25)[0]
    torch.testing.assert_close(ipo("loss.ipo_tau=0.25"), expected)
    assert not torch.allclose(ipo("loss.ipo_tau=0.25"), ipo())  # null: tau = beta


def test_every_option_a_loss_reads_is_a_config_key():
    """What the losses read (LossOptions) comes from loss.* (LossConfig), but for WRPO's alpha, which the trainer
    schedules from loss.wrpo_alpha: an option cannot be added to the losses without a key reaching it."""
    read = {field.name for field in dataclasses.fields(LossOptions)} - {"wrpo_alpha"}
    assert read <= {field.name for field in dataclasses.fields(LossConfig)}


def test_a_token_level_loss_has_the_gradient_of_the_global_token_mean_for_any_split():
    """SFT's micro-batch loss with the trainer's token_scale (M x D / T), divided by M as Megatron's schedule does
    and averaged over D as DDP does, has the gradient of sum(NLL) / T for every split of 8 rows of uneven lengths;
    a mean of per-row or per-micro-batch token means would not."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3.0, 9.0, 1.0, 4.0, 12.0, 2.0, 7.0, 5.0])
    nll = (torch.rand(8, generator=generator, dtype=torch.float64) + 0.5) * lengths  # per-row token sums
    tokens = lengths.sum().item()
    want = torch.autograd.grad((nll.requires_grad_(True).sum() / tokens), nll)[0]
    for data, micro_batches in ((1, 1), (1, 4), (2, 2), (4, 2), (2, 1)):
        rows = nll.detach().clone().requires_grad_(True)
        per_rank = rows.chunk(data)
        scale = micro_batches * data / tokens
        ranks = [sum(micro_batch_loss(part, token_level=True, token_scale=scale) / micro_batches
                     for part in share.chunk(micro_batches)) for share in per_rank]
        (got,) = torch.autograd.grad(sum(ranks) / data, rows)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    row_means = torch.autograd.grad((nll / lengths).mean(), nll)[0]
    assert not torch.allclose(row_means, want)
    # a preference loss: the mean over its micro-batch's rows
    assert micro_batch_loss(torch.tensor([1.0, 3.0]), token_level=False, token_scale=123.0).item() == 2.0
