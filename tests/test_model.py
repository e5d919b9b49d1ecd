from pathlib import Path

import pytest
import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from infifpo_mcore.config import ModelConfig
from infifpo_mcore.logprobs import response_positions, response_sequence_logps
from infifpo_mcore.model import build_pivot, build_transformer_config, set_response_positions
from tests.distributed import run_distributed


SMALL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
             seq_length=16)


def _response_only_logits_equal_full_logits(ctx):
    model_cfg = ModelConfig(**SMALL)
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


def _gradient_all_reduces_of_two_micro_batches(ctx, *, overlap: bool) -> None:
    model_cfg = ModelConfig(**SMALL)
    config = build_transformer_config(model=model_cfg, tensor=1, pipeline=1, precision="fp32")
    (model,) = build_pivot(model=model_cfg, config=config, vocab_size=256, device=ctx.device,
                           overlap_grad_reduce=overlap, bucket_size=20000)
    set_response_positions(model, None)
    buckets = len(model.bucket_groups)
    calls = []
    all_reduce = torch.distributed.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    def forward_step(data, chunk):
        tokens = next(data)
        return chunk(tokens, torch.arange(16).expand(2, 16), None), lambda logits: (logits.mean(), {})

    generator = torch.Generator().manual_seed(ctx.rank)
    for step in range(2):  # Megatron learns each bucket's gradient count in the first step and overlaps from the second
        micro_batches = [torch.randint(0, 256, (2, 16), generator=generator) for _ in range(2)]
        model.zero_grad_buffer()
        if step == 1:
            torch.distributed.all_reduce = counting_all_reduce
        try:  # no finalize_model_grads_func: only what the backward hooks start is counted
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro_batches),
                                        model=model, num_microbatches=2, seq_length=16, micro_batch_size=2,
                                        forward_only=False)
        finally:
            torch.distributed.all_reduce = all_reduce
        model.finish_grad_sync()
    # overlapped: each bucket once, during the last micro-batch's backward (the first ran under no_sync);
    # not overlapped: nothing during the backward, finish_grad_sync reduces after it
    assert buckets > 1 if overlap else buckets == 1
    assert len(calls) == (buckets if overlap else 0), (calls, buckets)


@pytest.mark.distributed
@pytest.mark.parametrize("overlap", [True, False])
def test_overlapped_gradient_reduce_starts_each_bucket_once_during_the_last_backward(overlap):
    run_distributed(_gradient_all_reduces_of_two_micro_batches, world_size=2, overlap=overlap)


def test_fp8_pivot_keeps_bf16_weights_and_asks_megatron_for_hybrid_fp8_gemms():
    config = build_transformer_config(model=ModelConfig(**SMALL), tensor=1, pipeline=1, precision="fp8")
    assert (config.fp8, config.bf16, config.params_dtype) == ("hybrid", True, torch.bfloat16)
    bf16 = build_transformer_config(model=ModelConfig(**SMALL), tensor=1, pipeline=1, precision="bf16")
    assert bf16.fp8 is None and bf16.bf16


def _bf16_pivot_keeps_fp32_main_weights_and_gradients(ctx, *, distributed: bool, root: Path) -> None:
    from infifpo_mcore import checkpointing
    from infifpo_mcore.config import load_config
    from infifpo_mcore.trainer import build_optimizer

    model_cfg = ModelConfig(**SMALL)
    config = build_transformer_config(model=model_cfg, tensor=1, pipeline=1, precision="bf16")
    chunks = build_pivot(model=model_cfg, config=config, vocab_size=256, device=ctx.device,
                         distributed_optimizer=distributed)
    optimizer, _ = build_optimizer(load_config(), chunks, precision="bf16", distributed_optimizer=distributed)
    (model,) = chunks
    # every weight bf16, the norms too (the local spec creates them in fp32; the pivot casts them, as Float16Module)
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    assert {param.main_grad.dtype for param in model.parameters()} == {torch.float32}  # accumulated in fp32
    (inner,) = optimizer.chained_optimizers
    main = [param for group in inner.optimizer.param_groups for param in group["params"]]
    assert main and {param.dtype for param in main} == {torch.float32}  # Adam steps fp32 main weights
    assert type(inner).__name__ == ("DistributedOptimizer" if distributed else "Float16OptimizerWithFloat16Params")
    # a model-only checkpoint (a converted model; an SFT stage's weights are read the same way) refreshes the fp32
    # main weights: a step that moves nothing (lr 0, zero gradients) keeps the loaded weights, not the built ones
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.25)
    loaded = {name: param.clone() for name, param in model.named_parameters()}
    checkpointing.save_checkpoint(root=root, step=1, model_chunks=chunks, optimizer=None, train_state=None,
                                  init_scores=None)
    with torch.no_grad():
        for param in model.parameters():
            param.sub_(0.25)
    assert checkpointing.load_checkpoint(path=root, model_chunks=chunks, optimizer=optimizer) == {}
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    assert all(torch.equal(param, loaded[name]) for name, param in model.named_parameters())


@pytest.mark.parametrize("distributed", [False, True])
def test_a_bf16_pivot_has_bf16_weights_and_fp32_main_weights_and_gradients(distributed, tmp_path):
    run_distributed(_bf16_pivot_keeps_fp32_main_weights_and_gradients, world_size=1, distributed=distributed,
                    root=tmp_path / "ckpt")
