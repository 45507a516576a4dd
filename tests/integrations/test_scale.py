"""Training at scale: mixed precision on a bf16 base, and resuming a 🤗 Trainer run from its checkpoint."""

import pytest
import torch

import fastprefix
from helpers.distributed import run_two
from helpers.models import METHODS, batch, perturb, run, tiny

# every method once, encoders and decoders alternating (both kinds for APT's two gates)
AMP_CASES = [("pt", "llama"), ("dept", "bert"), ("adept", "llama"), ("ptv2", "bert"), ("apt", "llama"),
             ("apt-pooled", "bert")]


@pytest.mark.parametrize("method, kind", AMP_CASES, ids=[f"{m}-{k}" for m, k in AMP_CASES])
def test_bf16_base_under_autocast_trains_a_float32_adapter(method, kind):
    """The adapter stays float32 on a bf16 base: float32 finite gradients and the exact float32 SGD update,
    including the small steps a bf16 parameter would round away. (Perturbed first: at init DePT's and ADePT's
    zero up-projections give their down-projections exactly zero gradients.)"""
    model = perturb(fastprefix.apply(tiny(kind, dtype=torch.bfloat16), METHODS[method]()), scale=0.1).train()
    params = dict(model.fastprefix.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    before = {n: p.detach().clone() for n, p in params.items()}
    ids, mask = batch([6, 3], "left" if kind == "llama" else "right")
    with torch.autocast("cpu", torch.bfloat16):
        out = run(model, kind, ids, mask)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    lr = 1e-3
    torch.optim.SGD(params.values(), lr=lr, foreach=False).step()
    rounded_away = 0
    for name, p in params.items():
        g = p.grad
        assert g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all()), name
        assert bool(g.ne(0).any()), f"{name} got an all-zero gradient"
        want = before[name].add(g, alpha=-lr)
        assert torch.equal(p.detach(), want), name  # SGD's float32 update, exactly
        # entries whose update a bf16 parameter would lose (same bf16 value before and after) but float32 keeps
        lost = want.bfloat16() == before[name].bfloat16()
        kept = p.detach() != before[name]
        rounded_away += int((lost & kept).sum())
    assert rounded_away > 0


def _classifier(method):
    model = tiny("bert", head="seq", dtype=torch.float32)
    return fastprefix.apply(model, METHODS[method](), trainable=("classifier",))


@pytest.mark.parametrize("method", ["adept"])
def test_trainer_resumes_a_fastprefix_run_with_the_same_losses(tmp_path, method):
    """4 steps in one go vs 2 steps, a checkpoint, and 2 more in a fresh process's worth of objects (a new
    model, a new Trainer). ADePT's dropout makes the restored RNG state matter too. (APT resumes the same
    way: the Trainer checkpoints ``model.state_dict()``, which holds ``fastprefix.*`` for every method.)"""
    import transformers as tf

    ids, mask = batch([6, 6, 4, 5, 6, 3, 2, 6])
    data = [dict(input_ids=ids[i], attention_mask=mask[i], labels=torch.tensor(i % 2)) for i in range(len(ids))]
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                learning_rate=0.05, report_to=[], save_strategy="steps", save_steps=2,
                                logging_steps=1, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=1)

    class Losses(tf.TrainerCallback):
        def __init__(self):
            self.seen = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.seen[state.global_step] = logs["loss"]

    whole, resumed = Losses(), Losses()
    model = _classifier(method)
    tf.Trainer(model=model, args=args, train_dataset=data, callbacks=[whole]).train()
    again = _classifier(method)
    tf.Trainer(model=again, args=args, train_dataset=data, callbacks=[resumed]).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert sorted(whole.seen) == [1, 2, 3, 4] and sorted(resumed.seen) == [3, 4]
    assert [resumed.seen[s] for s in (3, 4)] == [whole.seen[s] for s in (3, 4)]
    for name, want in model.fastprefix.state_dict().items():
        assert torch.equal(again.fastprefix.state_dict()[name], want), name
    assert torch.equal(again.classifier.weight, model.classifier.weight)


FSDP_METHODS = ("apt", "adept")  # a prefix method (its gate read outside the module's forward) and a prompt method


def _loss(out):
    """A loss that moves with every output coordinate (a plain mean square is ~constant after a LayerNorm)."""
    w = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return (out @ w).pow(2).mean()


def _fsdp_worker(rank, out_dir):
    import os

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    ids, mask = batch([6, 2, 5, 3])
    half = slice(2 * rank, 2 * rank + 2)
    for method in FSDP_METHODS:
        # eval mode: no dropout, so the ranks' halves add up to the whole batch's step
        model = perturb(fastprefix.apply(tiny("bert", dtype=torch.float32), METHODS[method]()), scale=0.1)
        # the README's recipe: each layer sharded, the method module its own group kept gathered for the
        # whole forward (the prefix is a view of its table; APT's gate is read inside the attention)
        for layer in model.encoder.layer:
            fully_shard(layer)
        fully_shard(model.fastprefix, reshard_after_forward=False)
        fully_shard(model)
        with pytest.raises(ValueError, match="are shards \\(FSDP2\\)"):
            fastprefix.save_adapter(model, os.path.join(out_dir, "never"))
        loss = _loss(model(input_ids=ids[half], attention_mask=mask[half]).last_hidden_state)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.fastprefix.named_parameters()}
        torch.optim.SGD(model.fastprefix.parameters(), lr=0.5).step()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            fastprefix.save_adapter(model, os.path.join(out_dir, method), state_dict=full)
        torch.save(dict(loss=loss.detach(), grads=grads), os.path.join(out_dir, f"{method}-{rank}.pt"))


def test_fsdp2_two_processes_match_one_process_and_save_a_full_adapter(tmp_path):
    run_two(_fsdp_worker, str(tmp_path))
    ids, mask = batch([6, 2, 5, 3])
    for method in FSDP_METHODS:
        model = perturb(fastprefix.apply(tiny("bert", dtype=torch.float32), METHODS[method]()), scale=0.1)
        loss = _loss(model(input_ids=ids, attention_mask=mask).last_hidden_state)
        loss.backward()
        ranks = [torch.load(tmp_path / f"{method}-{r}.pt") for r in range(2)]
        # float32: the mean of two half-batch losses/gradients vs the whole batch's
        torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach(), atol=1e-6, rtol=1e-6)
        for name, p in model.fastprefix.named_parameters():
            assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
            torch.testing.assert_close(ranks[0]["grads"][name], p.grad, atol=1e-6, rtol=1e-6, msg=name)
        torch.optim.SGD(model.fastprefix.parameters(), lr=0.5).step()
        reloaded = fastprefix.load_adapter(tiny("bert", dtype=torch.float32), tmp_path / method)
        for name, want in model.fastprefix.state_dict().items():
            torch.testing.assert_close(reloaded.fastprefix.state_dict()[name], want, atol=1e-6, rtol=1e-6, msg=name)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).last_hidden_state,
                                       model(input_ids=ids, attention_mask=mask).last_hidden_state,
                                       atol=1e-5, rtol=1e-5)
