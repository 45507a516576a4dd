"""Training at scale: DistributedDataParallel (2 CPU processes, gloo), the 🤗 Trainer, gradient checkpointing,
torch.compile."""

import os
import warnings

import pytest
import torch
from torch import nn

import fastprefix
from helpers.distributed import run_two
from helpers.models import METHODS, applied, batch, run, tiny

EXACT = dict(atol=1e-10, rtol=0)
DDP_METHODS = ("apt", "adept")


def _loss(out):
    """A loss that moves with every output coordinate (a plain mean square is ~constant after a LayerNorm)."""
    w = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return (out @ w).pow(2).mean()


def _global_batch():
    return batch([6, 2, 5, 3])


ROW_NAMES = ["b", "default", "default", "b"]  # per-row adapters: each rank's half holds both


# a second adapter "b" of each per-row DDP method: another length (and for APT another gate mode) than METHODS'
SECOND = {"apt": lambda: fastprefix.APTConfig(num_virtual_tokens=2, gate="pooled"),
          "adept": lambda: fastprefix.ADePTConfig(num_virtual_tokens=5, rank=3)}


def _two_adapters(method):
    """BERT with ``method`` as "default" and a second adapter "b" (:data:`SECOND`), the same on every process (the
    same seeded draws)."""
    model = applied("bert", method)
    torch.manual_seed(5)
    return fastprefix.add_adapter(model, SECOND[method](), "b")


def _adapters_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("fastprefix")}


def _ddp_worker(rank, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    ids, mask = _global_batch()
    half = slice(2 * rank, 2 * rank + 2)
    for method in DDP_METHODS:
        model = applied("bert", method)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(model.fastprefix.parameters(), lr=0.5)
        _loss(ddp(input_ids=ids[half], attention_mask=mask[half]).last_hidden_state).backward()
        opt.step()
        torch.save(model.fastprefix.state_dict(), os.path.join(out_dir, f"{method}-{rank}.pt"))
    for method in DDP_METHODS:  # per-row adapters: both adapters train on their own rows of each half
        model = _two_adapters(method)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        out = ddp(input_ids=ids[half], attention_mask=mask[half], adapter_names=ROW_NAMES[half])
        _loss(out.last_hidden_state).backward()
        opt.step()
        torch.save(_adapters_state(model), os.path.join(out_dir, f"rows-{method}-{rank}.pt"))


def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    run_two(_ddp_worker, str(tmp_path))
    ids, mask = _global_batch()
    for method in DDP_METHODS:
        model = applied("bert", method)
        before = {k: v.clone() for k, v in model.fastprefix.state_dict().items()}
        opt = torch.optim.SGD(model.fastprefix.parameters(), lr=0.5)
        _loss(model(input_ids=ids, attention_mask=mask).last_hidden_state).backward()
        opt.step()
        ranks = [torch.load(tmp_path / f"{method}-{r}.pt") for r in range(2)]
        for name, want in model.fastprefix.state_dict().items():
            assert torch.equal(ranks[0][name], ranks[1][name]), f"{method}.{name} differs between ranks"
            # float32 parameters: the all-reduced mean of two half-batch gradients vs one whole-batch gradient
            torch.testing.assert_close(ranks[0][name], want, atol=1e-6, rtol=1e-6, msg=f"{method}.{name}")
        assert any(not torch.equal(before[k], v) for k, v in model.fastprefix.state_dict().items())
    for method in DDP_METHODS:
        model = _two_adapters(method)
        before = _adapters_state(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        _loss(model(input_ids=ids, attention_mask=mask, adapter_names=ROW_NAMES).last_hidden_state).backward()
        opt.step()
        ranks = [torch.load(tmp_path / f"rows-{method}-{r}.pt") for r in range(2)]
        after = _adapters_state(model)
        for name, want in after.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), f"rows {method}.{name} differs between ranks"
            torch.testing.assert_close(ranks[0][name], want, atol=1e-6, rtol=1e-6, msg=f"rows {method}.{name}")
        for adapter in ("fastprefix.", "fastprefix_adapters.b."):  # each trained (ADePT's up-projection starts at 0)
            assert any(not torch.equal(before[k], v) for k, v in after.items() if k.startswith(adapter)), adapter


@pytest.mark.parametrize("method", ["apt", "adept"])
def test_hf_trainer_tiny_run(tmp_path, method):
    import transformers as tf

    model = tiny("bert", head="seq", dtype=torch.float32)
    fastprefix.apply(model, METHODS[method](), trainable=("classifier",))
    frozen = {k: v.clone() for k, v in model.bert.state_dict().items()}
    before = {k: v.clone() for k, v in model.fastprefix.state_dict().items()}
    ids, mask = batch([6, 6, 4, 5, 6, 3, 2, 6])
    data = [dict(input_ids=ids[i], attention_mask=mask[i], labels=torch.tensor(i % 2)) for i in range(len(ids))]
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                learning_rate=0.1, report_to=[], save_strategy="no", logging_steps=1,
                                use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    result = tf.Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert all(torch.equal(v, frozen[k]) for k, v in model.bert.state_dict().items())
    changed = [k for k, v in model.fastprefix.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the trainer did not update the method's parameters"


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.parametrize("kind, method", [("llama", "apt"), ("bert", "ptv2"), ("qwen2", "dept"), ("bert", "adept")],
                         ids=lambda x: x)
def test_gradient_checkpointing_gives_the_same_gradients(kind, method):
    """PEFT refuses prefix tuning with gradient checkpointing; the prefix here lives outside the cache, so it works."""
    grads = []
    for checkpointing in (False, True):
        model = _no_dropout(applied(kind, method).train())
        if checkpointing:
            with warnings.catch_warnings():  # transformers 5 renamed it activation_checkpointing_enable
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
        ids, mask = batch([6, 3], "left" if kind in ("llama", "qwen2") else "right")
        _loss(run(model, kind, ids, mask)).backward()
        grads.append({n: p.grad for n, p in model.fastprefix.named_parameters()})
    assert all(g is not None for g in grads[0].values())
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, **EXACT, msg=name)


def test_reentrant_checkpointing_is_a_clear_error_for_prefix_methods():
    model = applied("llama", "ptv2").train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids, mask = batch([6, 3], "left")
    with pytest.raises(ValueError, match="non-reentrant"):
        run(model, "llama", ids, mask)
    with torch.no_grad():
        run(model.eval(), "llama", ids, mask)  # inference does not checkpoint


@pytest.mark.parametrize("method", ["apt"])
def test_torch_compile_reference_path_matches_eager(method):
    """Dynamo + AOTAutograd capture of the hooks, the stashed prefix and the custom attention (the part that can
    break). The inductor backend passes the same test but takes minutes on 2 CPU cores, too long for CI."""
    model = applied("bert", method, dtype=torch.float32, backend="torch")  # eval: dropout RNG differs under compile
    ids, mask = batch([6, 3])
    results = []
    for fn in (model, torch.compile(model, backend="aot_eager", dynamic=False)):
        model.zero_grad()
        out = fn(input_ids=ids, attention_mask=mask).last_hidden_state
        _loss(out).backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.fastprefix.named_parameters()}))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert fastprefix.gate_report(fn).num_layers == 2  # the public API looks through the compile wrapper
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], atol=1e-6, rtol=1e-5, msg=name)
