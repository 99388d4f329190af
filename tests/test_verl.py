"""r1kernels.integrations.verl against verl's own policy losses (verl 0.9.1's core_algos).

verl pins transformers < 5.11, so these tests run in a separate environment that .ci/run builds
(verl installed with --no-deps plus what core_algos imports); elsewhere they skip.
"""
import itertools
import zlib

import pytest
import torch

from conftest import backends_for
from r1kernels import dispatch
from r1kernels.integrations.verl import (compute_policy_loss_r1k, compute_policy_loss_r1k_gspo,
                                         register_verl_policy_loss)

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
from verl.workers.config import FSDPActorConfig  # noqa: E402

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm")
LOSSES = {"vanilla": compute_policy_loss_r1k, "gspo": compute_policy_loss_r1k_gspo}
B, T = 6, 24


def actor_config(clip_ratio_c=3.0, global_batch_info=None, **kw):
    """verl's FSDP actor config; global_batch_info filled the way verl's ppo_loss fills it."""
    cfg = FSDPActorConfig(rollout_n=1, ppo_micro_batch_size_per_gpu=B, clip_ratio_low=0.2,
                          clip_ratio_high=0.28, clip_ratio_c=clip_ratio_c, **kw)
    cfg.global_batch_info.update(global_batch_info or {})
    return cfg


def make_inputs(seed, empty_row, with_rw):
    """A micro-batch with wide log-ratios (both clips and the dual clip hit), tokens whose
    log-ratio is past verl's +-20 clamp, a row whose mean log-ratio is past GSPO's clamp at 10, a
    row with advantage 0 and optionally a fully masked row and rollout IS weights."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3 - 0.05
    old = lp - torch.randn(B, T, generator=g) * 0.7
    old[0, 3], old[0, 7] = lp[0, 3] - 25.0, lp[0, 7] + 25.0
    old[1] = lp[1] - 12.0
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    adv[2] = 0.0
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1, : T // 2] = False
    if empty_row:
        mask[4] = False
    rw = torch.rand(B, T, generator=g) * 1.5 + 0.25 if with_rw else None
    return old, lp, adv, mask, rw


GLOBAL_INFOS = {
    # direct call: no global batch info (the micro-batch normalizes itself)
    "none": None,
    # what verl's worker fills for one micro-batch, one rank
    "one_micro": lambda mask: {"dp_size": 1, "batch_num_tokens": int(mask.sum()),
                               "global_batch_size": B, "loss_scale_factor": None},
    # 2 ranks, 3 micro-batches per mini-batch each, loss_scale_factor set
    "multi_micro": lambda mask: {"dp_size": 2, "batch_num_tokens": int(mask.sum()) * 5 + 17,
                                 "global_batch_size": 6 * B, "loss_scale_factor": T + 8},
}


def run(fn, inputs, agg, config):
    old, lp, adv, mask, rw = inputs
    x = lp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask,
                       loss_agg_mode=agg, config=config, rollout_is_weights=rw)
    loss.backward()
    return loss.detach(), x.grad, metrics


def check_same(ours, theirs):
    (loss, grad, metrics), (vloss, vgrad, vmetrics) = ours, theirs
    torch.testing.assert_close(loss, vloss, rtol=2e-6, atol=2e-6)  # sums with cancellation
    # fp32 rounding, relative to the largest gradient entry
    torch.testing.assert_close(grad, vgrad, rtol=0, atol=2e-6 * float(vgrad.abs().max()) + 1e-12)
    assert set(metrics) == set(vmetrics)
    for k in vmetrics:
        assert metrics[k] == pytest.approx(vmetrics[k], rel=1e-6, abs=1e-7), k
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("loss_mode", list(LOSSES))
@pytest.mark.parametrize("with_rw", [False, True], ids=["no_rw", "rw"])
@pytest.mark.parametrize("info", list(GLOBAL_INFOS))
@pytest.mark.parametrize("empty_row", [False, True], ids=["full", "empty_row"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_verl_policy_loss_matches_verl(agg, empty_row, info, with_rw, loss_mode):
    """Loss, gradient and metrics of r1k_<mode> equal verl's <mode> (120 cases)."""
    seed = zlib.crc32(f"{agg} {empty_row} {info} {with_rw} {loss_mode}".encode())
    inputs = make_inputs(seed, empty_row, with_rw)
    gbi = GLOBAL_INFOS[info]
    config = actor_config(global_batch_info=gbi and gbi(inputs[3]))
    theirs = run(core_algos.get_policy_loss_fn(loss_mode), inputs, agg, config)
    assert torch.isfinite(theirs[0])
    check_same(run(LOSSES[loss_mode], inputs, agg, config), theirs)


@pytest.mark.parametrize("backend", backends_for("grpo_loss"))
@pytest.mark.parametrize("loss_mode", list(LOSSES))
def test_verl_policy_loss_every_backend(backend, loss_mode):
    inputs = make_inputs(7, True, True)
    for agg, info in itertools.product(AGG_MODES, ("none", "multi_micro")):
        config = actor_config(global_batch_info=GLOBAL_INFOS[info] and
                              GLOBAL_INFOS[info](inputs[3]))
        theirs = run(core_algos.get_policy_loss_fn(loss_mode), inputs, agg, config)
        with dispatch.use_backend(backend):
            check_same(run(LOSSES[loss_mode], inputs, agg, config), theirs)


@pytest.mark.parametrize("clip_ratio_c", [1.1, 1.28, 1.5, 10.0])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_verl_dual_clip(clip_ratio_c, agg):
    """The dual clip at any clip_ratio_c, below or at 1 + clip_ratio_high (0.28) too; the
    fraction of tokens it clips is verl's pg_clipfrac_lower."""
    inputs = make_inputs(11, True, True)
    config = actor_config(clip_ratio_c=clip_ratio_c)
    theirs = run(core_algos.get_policy_loss_fn("vanilla"), inputs, agg, config)
    ours = run(compute_policy_loss_r1k, inputs, agg, config)
    check_same(ours, theirs)
    if clip_ratio_c < 5:
        assert theirs[2]["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("loss_mode", list(LOSSES))
def test_verl_worker_ppo_loss(loss_mode):
    """Through verl's own actor loss (verl.workers.utils.losses.ppo_loss, what the FSDP engine
    calls per micro-batch: it fills global_batch_info from the batch and calls the registered
    loss by name), policy_loss.loss_mode=r1k_<mode> gives what <mode> gives."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import PolicyLossConfig
    from verl.workers.utils.losses import ppo_loss

    register_verl_policy_loss()
    old, lp, adv, mask, rw = make_inputs(3, True, True)
    P = 3  # prompt length; log_probs come unpadded, [B * (P + T)], the response's shifted by one

    def step(mode, agg):
        config = actor_config(policy_loss=PolicyLossConfig(loss_mode=mode), loss_agg_mode=agg,
                              loss_scale_factor=T + 8)
        flat = torch.zeros(B, P + T)
        flat[:, P - 1:P - 1 + T] = lp
        flat = flat.reshape(-1).requires_grad_(True)
        data = TensorDict({"prompts": torch.ones(B, P, dtype=torch.long),
                           "responses": torch.ones(B, T, dtype=torch.long),
                           "attention_mask": torch.ones(B, P + T, dtype=torch.long),
                           "response_mask": mask.long(), "old_log_probs": old, "advantages": adv,
                           "rollout_is_weights": rw}, batch_size=[B])
        tu.assign_non_tensor(data, dp_size=2, batch_num_tokens=int(mask.sum()) * 3 + 5,
                             global_batch_size=4 * B)
        loss, metrics = ppo_loss(config, {"log_probs": flat}, data)
        loss.backward()
        return loss.detach(), flat.grad, {k: m.aggregate() for k, m in metrics.items()}

    for agg in AGG_MODES:
        (loss, grad, metrics), (vloss, vgrad, vmetrics) = step(f"r1k_{loss_mode}", agg), \
            step(loss_mode, agg)
        check_same((loss, grad, {k: float(v) for k, v in metrics.items()}),
                   (vloss, vgrad, {k: float(v) for k, v in vmetrics.items()}))


def test_verl_micro_batches_sum_to_the_mini_batch():
    """With the global batch info verl's worker fills, the gradients of a mini-batch's
    micro-batches add up to verl's for the whole mini-batch (and to r1k's for it)."""
    old, lp, adv, mask, rw = make_inputs(5, True, True)
    both = [torch.cat([t, t.flip(0)]) for t in (old, lp, adv, mask, rw)]
    for loss_mode, agg in itertools.product(LOSSES, AGG_MODES):
        info = {"dp_size": 1, "batch_num_tokens": int(both[3].sum()), "global_batch_size": 2 * B,
                "loss_scale_factor": None}
        whole = run(core_algos.get_policy_loss_fn(loss_mode), both, agg,
                    actor_config(global_batch_info=info))
        parts = [run(LOSSES[loss_mode], [t[i * B:(i + 1) * B] for t in both], agg,
                     actor_config(global_batch_info=info)) for i in range(2)]
        torch.testing.assert_close(parts[0][0] + parts[1][0], whole[0], rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), whole[1], rtol=2e-6,
                                   atol=1e-8)


def test_verl_config_forms():
    """An omegaconf DictConfig (verl's yaml) and the dataclass give the same result."""
    from omegaconf import OmegaConf

    inputs = make_inputs(3, True, False)
    cfg = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                            "clip_ratio_c": 3.0, "global_batch_info": {}})
    check_same(run(compute_policy_loss_r1k, inputs, "token-mean", cfg),
               run(core_algos.get_policy_loss_fn("vanilla"), inputs, "token-mean", actor_config()))


def test_verl_registration():
    register_verl_policy_loss("r1k_test", "r1k_test_gspo")
    assert core_algos.get_policy_loss_fn("r1k_test") is compute_policy_loss_r1k
    assert core_algos.get_policy_loss_fn("r1k_test_gspo") is compute_policy_loss_r1k_gspo


def test_verl_bad_inputs():
    old, lp, adv, mask, _ = make_inputs(0, False, False)
    config = actor_config()
    with pytest.raises(ValueError, match="loss_agg_mode"):
        compute_policy_loss_r1k(old, lp, adv, mask, "seq-sum", config)
    with pytest.raises(ValueError, match="config"):
        compute_policy_loss_r1k(old, lp, adv, mask, "token-mean", None)
    with pytest.raises(ValueError, match="advantages"):
        compute_policy_loss_r1k_gspo(old, lp, adv[:, 0], mask, "token-mean", config)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        compute_policy_loss_r1k(old, lp, adv, mask, "token-mean", actor_config(clip_ratio_c=1.0))
    with pytest.raises(ValueError, match="batch_num_tokens"):
        compute_policy_loss_r1k(old, lp, adv, mask, "token-mean",
                                actor_config(global_batch_info={"dp_size": 2}))
    with pytest.raises(ValueError, match="global_batch_size"):
        compute_policy_loss_r1k(old, lp, adv, mask, "seq-mean-token-sum",
                                actor_config(global_batch_info={"dp_size": 2}))
