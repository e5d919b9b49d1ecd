"""Why PP 2 x VPP 2 diverged from PP 2 after the warm-up micro-batches: Megatron's batched p2p at pipeline size 2.

In the interleaved schedule's steady state each rank sends, in one exchange, its activation to the next stage and a
gradient to the previous one, and receives the reverse. At PP 2 the previous and the next rank are the same peer, so
two tensors of one shape travel to that peer together. With ``batch_p2p_comm=True`` (Megatron's default) they go in
one ``batch_isend_irecv`` ordered [send_prev, recv_prev, send_next, recv_next] on both ranks: the sender posts
(gradient, activation), the receiver its receives as (activation, gradient), and the transport pairs messages
between two ranks in posting order — the activation lands in the gradient's buffer and the other way round. Unbatched
(``overlap_p2p_comm=True, batch_p2p_comm=False``, what Megatron-LM configures for a virtual pipeline) the two
directions use two process groups and arrive where they belong. Without VPP the steady state never sends both ways
to one peer at once, so PP 2 alone is unaffected.

    torchrun --nproc_per_node 2 docs/repro/vpp_batched_p2p.py

prints, on megatron-core 0.16.1 / torch 2.13 / gloo (docs/parallelism.md#virtual-pipeline):

    batch_p2p_comm=True : rank 0 received activation -2.0 and gradient +2.0 (sent: +2.0, -2.0): swapped
    batch_p2p_comm=True : rank 1 received activation -1.0 and gradient +1.0 (sent: +1.0, -1.0): swapped
    batch_p2p_comm=False: rank 0 received activation +2.0 and gradient -2.0 (sent: +2.0, -2.0): as sent
    batch_p2p_comm=False: rank 1 received activation +1.0 and gradient -1.0 (sent: +1.0, -1.0): as sent
"""

import os

import torch
import torch.distributed as dist

from infifpo_mcore.compat import cpu as cpu_compat


def exchange(*, batched: bool) -> tuple[float, float]:
    """Both ranks send an activation (value 1 + rank) forward and a gradient (value -(1 + rank)) back; returns what
    this rank received as (activation from the previous rank, gradient from the next rank)."""
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    config = ModelParallelConfig(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                                 batch_p2p_comm=batched, overlap_p2p_comm=not batched)
    communicator = P2PCommunicator(pp_group=parallel_state.get_pipeline_model_parallel_group(), config=config)
    rank = dist.get_rank()
    shape = (4, 1, 8)
    activation = torch.full(shape, 1.0 + rank)
    gradient = torch.full(shape, -(1.0 + rank))
    received_activation, received_gradient = communicator.send_forward_backward_recv_forward_backward(
        activation, gradient, recv_prev=True, recv_next=True, tensor_shape=shape)
    return received_activation.flatten()[0].item(), received_gradient.flatten()[0].item()


def main() -> None:
    cpu_compat.apply()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    for batched in (True, False):
        activation, gradient = exchange(batched=batched)
        # the peer sent activation 1 + peer and gradient -(1 + peer)
        right = activation == 1.0 + peer and gradient == -(1.0 + peer)
        print(f"batch_p2p_comm={str(batched):5}: rank {rank} received activation {activation:+.1f} and gradient "
              f"{gradient:+.1f} (sent: {1.0 + peer:+.1f}, {-(1.0 + peer):+.1f}): "
              f"{'as sent' if right else 'swapped'}", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
