"""The last stage's loss path: the policy's response scores, the batch's reference columns and every loss option of
the config reach the pure loss."""

import dataclasses

import torch

from infifpo_mcore.config import LossConfig, load_config
from infifpo_mcore.losses import LossOptions, compute_loss
from infifpo_mcore.train_step import loss_rows

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


def test_sft_rows_lose_their_summed_response_nll_which_the_trainer_divides_by_the_response_tokens():
    """SFT's per-row loss is the chosen response's NLL summed over its tokens (train_step's module docstring: the
    micro-batch returns their sum with its response-token count, so Megatron's per-token loss gives the global token
    mean); a preference loss's row loss does not depend on the response lengths that way."""
    loss = load_config(overrides=["loss.type=sft"]).loss
    row_losses, metrics = loss_rows({"chosen": RESPONSES["chosen"]}, {}, loss, wrpo_alpha=0.0)
    torch.testing.assert_close(row_losses, torch.tensor([12.0, 30.0]))
    torch.testing.assert_close(metrics["logps/chosen"], torch.tensor([-12.0, -30.0]))
