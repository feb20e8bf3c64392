"""Hugging Face Trainer: hyperparameters from TrainingArguments, exact resume, layer-wise updates under Trainer."""

import shutil

import pytest
import torch

import galore_mini as gm
from conftest import tiny_llama
from galore_mini import methods

transformers = pytest.importorskip("transformers")
from galore_mini import hf  # noqa: E402  (needs transformers)

STEPS = 7
OPTIONS = {"rank": 4, "update_proj_gap": 3}  # refreshes at steps 1, 4, 7: a checkpoint at 5 is mid-window


@pytest.fixture(autouse=True)
def _quiet():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


class Tokens(torch.utils.data.Dataset):
    """10 sequences: batches of 2 and accumulation 2 give 3 optimizer steps per epoch, the last one short."""

    def __init__(self, n=10, seq=12, vocab=128, seed=3):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out, **overrides):
    kwargs = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  max_steps=STEPS, learning_rate=1e-2, weight_decay=0.05, adam_beta1=0.85, adam_beta2=0.98,
                  adam_epsilon=1e-7, lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=0.5,
                  save_strategy="no", logging_steps=1, report_to="none", use_cpu=True, dataloader_num_workers=0,
                  seed=0, disable_tqdm=True)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


class _Recording:
    """Keeps every micro-batch Trainer feeds the model, with its optimizer step and loss normaliser."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen.append((self.state.global_step, inputs["input_ids"].clone(), num_items_in_batch))
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class RecordingTrainer(_Recording, transformers.Trainer):
    seen: list


class RecordingLayerwiseTrainer(_Recording, hf.LayerwiseTrainer):
    seen: list


class _Steps(transformers.TrainerCallback):
    """Counts the optimizer steps this run takes; stops training after step `stop_at`."""

    def __init__(self, stop_at=None):
        self.stop_at, self.taken = stop_at, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.taken += 1
        if state.global_step == self.stop_at:
            control.should_training_stop = True


def _train(cls, args, method="galore_mini", stop_at=None, resume=None, **options):
    model = tiny_llama()
    optimizers = (None, None) if method is None else hf.trainer_optimizers(model, args, method, **options)
    trainer = cls(model=model, args=args, train_dataset=Tokens(), optimizers=optimizers)
    trainer.seen = []
    trainer.steps = _Steps(stop_at)
    trainer.add_callback(trainer.steps)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def _windows(trainer):
    windows: dict[int, list] = {}
    for step, ids, n in trainer.seen:
        windows.setdefault(step, []).append((ids, n))
    return [windows[s] for s in sorted(windows)]


def _scheduler(args, opt):
    return transformers.get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(STEPS),
                                      num_training_steps=STEPS)


def _reference_optimizer(model, args, method):
    # the values TrainingArguments hold, spelled out: what gm.hf must pass on
    return gm.create_optimizer(model, method, lr=args.learning_rate, weight_decay=args.weight_decay,
                               betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, **OPTIONS)


def _loss(model, ids, n):
    return model(input_ids=ids, labels=ids, num_items_in_batch=n).loss


def _assert_equal(model_a, model_b):
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(a, b), f"{name}: max difference {(a - b).abs().max().item():.3g}"


# -- what the optimizer takes from TrainingArguments ----------------------------------------------


@pytest.mark.parametrize("method", methods.OPTIMIZER_METHODS)
def test_every_optimizer_takes_its_hyperparameters_from_training_arguments(method, tmp_path):
    model = tiny_llama()
    entry = methods.get(method)
    args = _args(tmp_path) if entry.eps is not None else _args(tmp_path, adam_beta1=0.9, adam_beta2=0.999,
                                                                 adam_epsilon=1e-8)
    opt, scheduler = hf.trainer_optimizers(model, args, method, rank=4)
    assert scheduler is None  # Trainer builds lr_scheduler_type/warm-up itself, from its own step count
    assert opt.__class__.__name__ == entry.optimizer
    no_decay = {id(p) for name, p in model.named_parameters() if "norm" in name or name.endswith("bias")}
    assert no_decay  # the tiny Llama has RMSNorm weights
    for group in opt.param_groups:
        assert group["lr"] == args.learning_rate
        decays = {group["weight_decay"] == args.weight_decay if id(p) not in no_decay else group["weight_decay"] == 0
                  for p in group["params"]}
        assert decays == {True}, "weight decay on every weight but norms and biases, as Trainer splits it"
        if entry.eps is not None:
            assert tuple(group["betas"]) == (args.adam_beta1, args.adam_beta2) and group["eps"] == args.adam_epsilon
    if entry.projected:
        assert any(g.get("rank") == 4 for g in opt.param_groups)


def test_optim_target_modules_selects_the_projected_weights(tmp_path):
    model = tiny_llama()
    opt, _ = hf.trainer_optimizers(model, _args(tmp_path, optim_target_modules=["q_proj", "v_proj"]), "galore_mini",
                                   rank=4)
    names = {id(p): n for n, p in model.named_parameters()}
    projected = sorted(names[id(p)] for g in opt.param_groups if "rank" in g for p in g["params"])
    assert projected and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in projected)
    assert len(projected) == 2 * model.config.num_hidden_layers


def test_conflicting_or_ignored_settings_are_refused(tmp_path):
    model, args = tiny_llama(), _args(tmp_path)
    with pytest.raises(gm.UsageError, match=r"lr \(TrainingArguments.learning_rate\)"):
        hf.trainer_optimizers(model, args, "galore_mini", lr=1e-3)
    with pytest.raises(gm.UsageError, match="weight_decay"):
        hf.trainer_optimizers(model, args, "adam_mini", weight_decay=0.1)
    with pytest.raises(gm.UsageError, match="adam_beta1, adam_beta2, adam_epsilon cannot apply to GaLore-Adafactor"):
        hf.trainer_optimizers(model, args, "galore_adafactor")
    with pytest.raises(gm.UsageError, match="optim_target_modules.*Adam-mini projects nothing"):
        hf.trainer_optimizers(model, _args(tmp_path, optim_target_modules=["q_proj"]), "adam_mini")
    with pytest.raises(gm.UsageError, match="disagrees with TrainingArguments.optim_target_modules"):
        hf.trainer_optimizers(model, _args(tmp_path, optim_target_modules=["q_proj"]), "galore", target_modules="all-linear")
    with pytest.raises(gm.UsageError, match="optim='adafactor' would be ignored"):
        hf.trainer_optimizers(model, _args(tmp_path, optim="adafactor"), "galore_mini")
    with pytest.raises(gm.UsageError, match="optim_args"):
        hf.trainer_optimizers(model, _args(tmp_path, optim_args="rank=8"), "galore")
    with pytest.raises(gm.UsageError, match="re-parametrises the model"):
        hf.trainer_optimizers(model, args, "lora")
    with pytest.raises(gm.UsageError, match="did you mean 'galore_mini'"):
        hf.trainer_optimizers(model, args, "galore_mni")


# -- Trainer runs what the arguments say, and resumes exactly ---------------------------------------


def test_trainer_run_equals_hand_written_loop(tmp_path):
    """learning rate, cosine warm-up, accumulation (with a short last window per epoch), clipping, decay."""
    args = _args(tmp_path)
    model, trainer = _train(RecordingTrainer, args, "galore_mini", **OPTIONS)
    windows = _windows(trainer)
    assert [len(w) for w in windows] == [2, 2, 1, 2, 2, 1, 2]

    ref = tiny_llama()
    opt = _reference_optimizer(ref, args, "galore_mini")
    sched = _scheduler(args, opt)
    lrs, norms = [], []
    for window in windows:
        for ids, n in window:
            _loss(ref, ids, n).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), args.max_grad_norm)))
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    _assert_equal(model, ref)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["learning_rate"] for h in logs] == pytest.approx(lrs, rel=1e-6)
    assert [h["grad_norm"] for h in logs] == pytest.approx(norms, rel=1e-6)
    assert max(norms) > args.max_grad_norm  # clipping was active
    assert not torch.equal(next(model.parameters()), next(tiny_llama().parameters()))


@pytest.mark.parametrize("trainer_cls,method", [
    (transformers.Trainer, "galore_mini"),
    (transformers.Trainer, "adam_mini"),
    (transformers.Trainer, "galore"),
    (hf.LayerwiseTrainer, "galore_mini"),
])
def test_resume_from_checkpoint_is_bitwise(trainer_cls, method, tmp_path):
    whole, _ = _train(trainer_cls, _args(tmp_path / "whole"), method, **OPTIONS)
    args = _args(tmp_path / "split", save_strategy="steps", save_steps=5)
    stopped, _ = _train(trainer_cls, args, method, stop_at=5, **OPTIONS)  # mid-epoch, mid-projector-window
    checkpoint = tmp_path / "split" / "checkpoint-5"
    assert not all(torch.equal(a, b) for a, b in zip(whole.parameters(), stopped.parameters()))

    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what Trainer's loader does
    if methods.get(method).projected:
        projectors = [s["projector"] for s in state["state"].values() if "projector" in s]
        assert projectors and all(isinstance(p, torch.Tensor) for p in projectors)
    if trainer_cls is hf.LayerwiseTrainer:
        assert state["layerwise"]["step_count"] == 5

    resumed, trainer = _train(trainer_cls, args, method, resume=str(checkpoint), **OPTIONS)
    assert trainer.steps.taken == STEPS - 5 and trainer.state.global_step == STEPS
    _assert_equal(whole, resumed)

    if trainer_cls is transformers.Trainer and method == "galore_mini":
        # the comparison sees the optimizer state: the same checkpoint with a freshly built optimizer's state
        # (no moments, no projectors; same schedule, weights and data position) ends elsewhere
        stateless = tmp_path / "stateless"
        shutil.copytree(checkpoint, stateless)
        torch.save(hf.create_optimizer(tiny_llama(), args, method, **OPTIONS).state_dict(), stateless / "optimizer.pt")
        fresh, _ = _train(trainer_cls, args, method, resume=str(stateless), **OPTIONS)
        assert not all(torch.equal(a, b) for a, b in zip(whole.parameters(), fresh.parameters()))


# -- layer-wise updates under Trainer ----------------------------------------------------------------


def test_layerwise_trainer_equals_layerwise_loop(tmp_path):
    args = _args(tmp_path)
    model, trainer = _train(RecordingLayerwiseTrainer, args, "galore_mini", **OPTIONS)
    windows = _windows(trainer)
    assert [len(w) for w in windows] == [2, 2, 1, 2, 2, 1, 2]

    ref = tiny_llama()
    opt = _reference_optimizer(ref, args, "galore_mini")
    sched = _scheduler(args, opt)
    handle = gm.layerwise(ref, opt, accumulation_steps=2, max_grad_norm=args.max_grad_norm)
    lrs, norms = [], []
    for window in windows:
        lrs.append(sched.get_last_lr()[0])
        for ids, n in window:
            _loss(ref, ids, n).backward()
        if not handle.stepped:
            assert len(window) == 1 and handle.flush()  # Trainer's short last window of the epoch
        norms.append(float(handle.last_grad_norm))
        sched.step()
    assert handle.step_count == STEPS
    _assert_equal(model, ref)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["learning_rate"] for h in logs] == pytest.approx(lrs, rel=1e-6)  # one scheduler step per update
    assert [h["grad_norm"] for h in logs] == pytest.approx(norms, rel=1e-6)
    assert max(norms) > args.max_grad_norm
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["galore_mini", None])  # None: Trainer's own AdamW, made layer-wise
def test_layerwise_trainer_equals_trainer_without_clipping(method, tmp_path):
    args = _args(tmp_path, max_grad_norm=0.0)
    plain, _ = _train(transformers.Trainer, args, method, **({} if method is None else OPTIONS))
    layerwise, trainer = _train(hf.LayerwiseTrainer, args, method, **({} if method is None else OPTIONS))
    assert isinstance(hf._unwrap(trainer.optimizer), hf.LayerwiseOptimizer)
    for (name, a), (_, b) in zip(plain.named_parameters(), layerwise.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(next(plain.parameters()), next(tiny_llama().parameters()))


def test_layerwise_refuses_what_it_cannot_do(tmp_path, monkeypatch):
    model, args = tiny_llama(), _args(tmp_path)
    with pytest.raises(gm.UsageError, match="fp16=True"):
        bad = _args(tmp_path)
        bad.fp16 = True
        hf.LayerwiseTrainer(model=model, args=bad, train_dataset=Tokens())
    with pytest.raises(gm.UsageError, match="Hugging Face's own layer-wise mode"):
        hf.LayerwiseTrainer(model=model, args=_args(tmp_path, optim="galore_adamw_layerwise",
                                                    optim_target_modules=["attn"]), train_dataset=Tokens())

    from transformers.training_args import ParallelMode
    with monkeypatch.context() as patch:
        patch.setattr(transformers.TrainingArguments, "parallel_mode", property(lambda self: ParallelMode.DISTRIBUTED))
        with pytest.raises(gm.UsageError, match="parallel_mode='distributed'.*replicas drift apart"):
            hf.LayerwiseTrainer(model=model, args=args, train_dataset=Tokens())

    # an optimizer that already updates layer-wise: its accumulation and clipping would not be Trainer's
    opt = hf.create_optimizer(model, args, "galore_mini", **OPTIONS)
    handle = gm.layerwise(model, opt, accumulation_steps=1)
    trainer = hf.LayerwiseTrainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))
    with pytest.raises(gm.UsageError, match="already has a gm.layerwise"):
        trainer.train()
    handle.remove()
    mismatched = hf.LayerwiseOptimizer(model, hf.create_optimizer(model, args, "galore_mini", **OPTIONS),
                                       accumulation_steps=4)
    trainer = hf.LayerwiseTrainer(model=model, args=args, train_dataset=Tokens(), optimizers=(mismatched, None))
    with pytest.raises(gm.UsageError, match="accumulation_steps=4.*gradient_accumulation_steps=2"):
        trainer.train()


def test_layerwise_optimizer_step_checks_the_windows_agree():
    model = tiny_llama()
    lw = hf.LayerwiseOptimizer(model, gm.create_optimizer(model, "galore_mini", rank=4), accumulation_steps=1)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="no backward"):
        lw.step()
    model(input_ids=ids, labels=ids).loss.backward()
    lw.step()  # one update, one step: fine
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="2 layer-wise updates happened between two optimizer.step"):
        lw.step()
    assert lw.handle.step_count == 3


# -- the documented examples run -------------------------------------------------------------------


def test_documented_examples_run(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    blocks = re.findall(r"```python\n(.*?)```", (root / "docs" / "hf-trainer.md").read_text(), re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "docs/hf-trainer.md", "exec"), namespace)  # ordinary updates, checkpoints at 2, 4
    assert namespace["trainer"].state.global_step == 4 and (tmp_path / "out" / "checkpoint-4").is_dir()
    first = {n: p.detach().clone() for n, p in namespace["model"].named_parameters()}
    exec(compile(blocks[2], "docs/hf-trainer.md", "exec"), namespace)  # layer-wise, on the trained model
    assert isinstance(hf._unwrap(namespace["trainer"].optimizer), hf.LayerwiseOptimizer)
    assert not all(torch.equal(first[n], p) for n, p in namespace["model"].named_parameters())

    exec(compile(blocks[1], "docs/hf-trainer.md", "exec"), namespace)  # the create_optimizer override
    args = transformers.TrainingArguments(str(tmp_path / "init"), max_steps=2, per_device_train_batch_size=4,
                                          learning_rate=3e-3, report_to="none", use_cpu=True)
    trainer = namespace["GaLoreTrainer"](model_init=lambda: tiny_llama(), args=args,
                                         train_dataset=namespace["data"])
    trainer.train()
    inner = hf._unwrap(trainer.optimizer)
    assert type(inner) is gm.GaLoreMini and inner.param_groups[0]["initial_lr"] == 3e-3
    assert {int(s["step"]) for s in inner.state.values()} == {2}

