import torch

from infifpo_mcore.config import ModelConfig
from infifpo_mcore.logprobs import response_positions, response_sequence_logps
from infifpo_mcore.model import build_pivot, build_transformer_config, set_response_positions
from tests.distributed import run_distributed


def _response_only_logits_equal_full_logits(ctx):
    model_cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, seq_length=16)
    config = build_transformer_config(model=model_cfg, tensor=1, pipeline=1, precision="fp32")
    (model,) = build_pivot(model=model_cfg, config=config, vocab_size=256, device=ctx.device)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (4, 16), generator=generator)
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.zeros(4, 16)
    mask[0, 5:9] = 1
    mask[1, 2:3] = 1
    mask[2, 10:15] = 1
    mask[3, 0:16] = 1
    positions = torch.arange(16).expand(4, 16)

    set_response_positions(model, None)
    full_logits = model(tokens, positions, None)  # [4, 16, V]
    expected = (torch.log_softmax(full_logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)

    set_response_positions(model, response_positions(mask))
    selected_logits = model(tokens, positions, None)
    assert selected_logits.shape == (1, int(mask.sum()), 256)
    sums, _ = response_sequence_logps(logits=selected_logits, labels=labels, loss_mask=mask)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)


def test_response_only_output_projection_gives_the_full_logits_result():
    run_distributed(_response_only_logits_equal_full_logits, world_size=1)
