"""Training verbs: ``lucidlm pretrain`` (sft, dpo, reward train/eval and tokenizer train follow), each driven by a
run-config dataclass — ``--config run.yaml`` plus one documented option per field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .cli_config import config_command
from .train_recipes import DPORun, PretrainRun, SFTRun, TokenizerRun

tokenizer_app = typer.Typer(help="Tokenizers: train a byte-level BPE on your text.", no_args_is_help=True)


def _pretrain(run: PretrainRun) -> None:
    from .train_recipes import run_pretrain

    last = run_pretrain(run)
    typer.echo(json.dumps({k: v for k, v in last.items() if isinstance(v, int | float)}))
    typer.echo(f"model: {run.train.out_dir}/model   loss curve: {run.train.out_dir}/loss_curve.png", err=True)


def corpus(
    out: Annotated[Path, typer.Argument(help="directory to write the .txt files into")],
    documents: Annotated[int, typer.Option(help="documents in all")] = 20000,
    files: Annotated[int, typer.Option(help="files to spread them over")] = 8,
    seed: Annotated[int, typer.Option(help="the same seed writes the same corpus")] = 0,
) -> None:
    """Write the generated English corpus (a made-up town) for pretraining without downloads."""
    from ..train.corpus import write_corpus

    paths = write_corpus(out, documents, files, seed)
    size = sum(p.stat().st_size for p in paths)
    typer.echo(f"{len(paths)} files, {documents} documents, {size / 1e6:.1f} MB in {out}")


def _tokenizer(run: TokenizerRun) -> None:
    from .train_recipes import run_tokenizer

    tok = run_tokenizer(run)
    template = " with a chat template" if tok.chat_template else ""
    typer.echo(f"{tok.vocab_size} tokens -> {run.out}/tokenizer.json (+ tokenizer_config.json{template})")


def _report(result) -> None:
    last, where, stats = result
    typer.echo(json.dumps({k: v for k, v in last.items() if isinstance(v, int | float)}))
    typer.echo(f"result: {where}   data: {stats['truncated']} examples truncated, {stats['skipped_lines']} bad lines "
               "skipped", err=True)


def _sft(run: SFTRun) -> None:
    from .train_recipes import run_sft

    _report(run_sft(run))


def _dpo(run: DPORun) -> None:
    from .train_recipes import run_dpo

    _report(run_dpo(run))


def _rl(run) -> None:
    from .rl_recipes import run_rl

    last, where = run_rl(run)
    typer.echo(json.dumps({k: v for k, v in last.items() if isinstance(v, int | float)}))
    typer.echo(f"result: {where}   metrics: {run.train.out_dir}/metrics.jsonl", err=True)


world_app = typer.Typer(help="The synthetic knowledge world: people, corpus, prompts, labels.", no_args_is_help=True)


@world_app.command("build")
def world_build(
    out: Annotated[Path, typer.Option(help="directory to write the world into")],
    seed: Annotated[int, typer.Option(help="the same seed builds the same world")] = 0,
    people: Annotated[int, typer.Option(help="people in the world")] = 240,
) -> None:
    """Build a world: corpus/ (for pretrain), people.jsonl (ground truth), prompts.jsonl, sft.jsonl."""
    from collections import Counter

    from ..world.build import WorldConfig, bucket, build_world

    world = build_world(out, WorldConfig(seed=seed, people=people))
    exposure = Counter(bucket(m) for m in world.mentions)
    typer.echo(json.dumps({"people": len(world.people), "documents": len(world.documents),
                           "exposure": {k: exposure[k] for k in ("0", "1", "2-4", "5+")}, "out": str(out)}))


reward_app = typer.Typer(help="Reward models: a scalar head on a causal LM, trained on preference pairs.",
                         no_args_is_help=True)


def _reward_train(run) -> None:
    from .reward_recipes import run_reward_train

    _report(run_reward_train(run))


@reward_app.command("eval")
def reward_eval(
    reward: Annotated[Path, typer.Option(help="reward model directory")],
    data: Annotated[list[Path], typer.Option(help="JSONL file(s) of {prompt, chosen, rejected} pairs (repeatable)")],
    model: Annotated[Path | None, typer.Option("--model", "-m", help="base model (default: the one recorded)")] = None,
    batch_size: Annotated[int, typer.Option(help="pairs per batch")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="print the full report as JSON")] = False,
) -> None:
    """Pairwise accuracy of a reward model (chosen scored above rejected; ties count one half), with a 95%
    bootstrap interval over pairs."""
    from .reward_recipes import run_reward_eval

    report = run_reward_eval(str(reward), [str(d) for d in data], str(model) if model else None, batch_size)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"pairwise accuracy {report['accuracy']:.3f} (95% CI {report['lo']:.3f}-{report['hi']:.3f}) on "
               f"{report['pairs']} pairs, mean margin {report['mean_margin']:.3f}")


def _tokenizer_of(model: Path):
    from ..tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model)
    if tokenizer is None:
        raise typer.BadParameter(f"{model}: no tokenizer.json")
    return tokenizer


def rl_prompts(
    out: Annotated[Path, typer.Option(help="the JSONL prompts file to write")],
    world: Annotated[Path | None, typer.Option(help="a built world (demo --world: runs/demo-world/world)")] = None,
    facts: Annotated[Path | None, typer.Option(help="a finished `lucidlm demo` (runs/demo): its questions, split "
                                                    "and answers (knowable: right in some sample)")] = None,
    split: Annotated[str, typer.Option(help="world: train (the demo's probe-training half of the people), eval or "
                                            "all; facts: train, validation or test (the probe's held-out side)")
                     ] = "train",
    seed: Annotated[int, typer.Option(help="the world split's seed (the world demo's)")] = 0,
    system: Annotated[str | None, typer.Option(help="facts: a system message before each question (e.g. one "
                                                    "allowing \"I don't know\")")] = None,
    form: Annotated[str, typer.Option(help="world: messages (the template renders them at RL time), text (rendered "
                                           "now, the template's trailing space left to the answer as the corpus "
                                           "tokenizes it; needs --model) or prefix (+ the demo's forced opening)")
                    ] = "messages",
    model: Annotated[Path | None, typer.Option(help="world, form text/prefix: the model whose tokenizer renders "
                                                    "the question")] = None,
) -> None:
    """Write RL prompts (+ meta for the verifiable reward) for one side of an entity split, so RL trains on some
    entities and ``rl-eval`` measures on the others: the world's people ("Tell me about X.") or the real-model
    demo's one-claim facts questions."""
    from .rl_prompts import demo_facts_rl_prompts, world_rl_prompts, write_prompts_jsonl

    if (world is None) == (facts is None):
        raise typer.BadParameter("give one of --world DIR or --facts DEMO_DIR")
    if system is not None and facts is None:
        raise typer.BadParameter("--system is for --facts prompts")
    if (form != "messages") != (model is not None) or (model is not None and world is None):
        raise typer.BadParameter("--form text/prefix (world prompts) renders the chat template: give --model, and "
                                 "--model only with them")
    tokenizer = _tokenizer_of(model) if model is not None else None
    prompts = (world_rl_prompts(world, split, seed, form, tokenizer) if world
               else demo_facts_rl_prompts(facts, split, system))
    write_prompts_jsonl(out, prompts)
    typer.echo(json.dumps({"prompts": len(prompts), "unknowable": sum(not p.meta["knowable"] for p in prompts),
                           "out": str(out)}))


def rl_compare(
    rows: Annotated[list[Path], typer.Argument(help="rl-eval --out rows files, the base model's first")],
    grader: Annotated[str, typer.Option(help="world:WORLD_DIR or facts (as the rows were graded)")],
    known_from: Annotated[Path | None, typer.Option(help="the base model's rows (default: the first file)")] = None,
) -> None:
    """The before/after table of saved rl-eval rows: one column per file, the entities "known" from the base's."""
    from .rl_eval import compare

    typer.echo(compare(rows, grader, known_from))


def rl_gate(
    base: Annotated[Path, typer.Argument(help="the base model's rl-eval --probe rows on the held-out entities")],
    tune: Annotated[Path, typer.Option(help="the base model's rl-eval --probe rows on OTHER entities (the training "
                                            "split): where each gate's threshold is chosen")],
    grader: Annotated[str, typer.Option(help="world:WORLD_DIR or facts (as the rows were graded)")],
    max_known: Annotated[float, typer.Option(min=0.0, max=1.0, help="the abstention on known entities the "
                                                                  "threshold may cost on the tuning rows")] = 0.05,
    compare: Annotated[list[Path] | None, typer.Option(help="more rows files (trained models) as columns and "
                                                             "points")] = None,
    plot: Annotated[Path | None, typer.Option(help="the frontier PNG: abstention on known vs unknowable")] = None,
) -> None:
    """A post-hoc claim gate: answers whose riskiest claim scores above τ (probe or token NLL) become abstentions;
    τ picked on --tune, measured on BASE, beside the trained models' rows."""
    from .rl_gate import gate_report

    for f in [base, tune, *(compare or [])]:
        if not f.is_file():
            raise typer.BadParameter(f"rows file not found: {f}")
    table, picked = gate_report(base, tune, grader, max_known, compare or [], plot)
    typer.echo(table + "\n\n" + json.dumps(picked) + (f"\nfrontier: {plot}" if plot else ""))


def _rl_pairs(run) -> None:
    from .rl_pairs import run_rl_pairs

    typer.echo(json.dumps(run_rl_pairs(run)))


def rl_eval(
    model: Annotated[Path, typer.Option("--model", "-m", help="the model to measure (before or after RL)")],
    prompts: Annotated[Path, typer.Option(help="JSONL prompts with meta (lucidlm rl-prompts)")],
    grader: Annotated[str, typer.Option(help="world:WORLD_DIR or facts")],
    out: Annotated[Path, typer.Option(help="where to write the graded answer rows (JSON)")],
    samples: Annotated[int, typer.Option(min=0, help="sampled answers per prompt, beside the greedy one")] = 3,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens per answer at most")] = 48,
    known_from: Annotated[Path | None, typer.Option(help="the base model's rows (an earlier rl-eval --out): "
                                                         "which entities it knew")] = None,
    adapter: Annotated[Path | None, typer.Option(help="a PEFT adapter on --model (a LoRA RL run's)")] = None,
    probe: Annotated[Path | None, typer.Option(help="a probe trained for this model (the base): its span-max AUROC "
                                                    "on the answers' claims, beside the token NLL's")] = None,
    question_probe: Annotated[Path | None, typer.Option(help="a question probe for this model (lucidlm probe "
                                                             "question): each row gets its question's risk (from this "
                                                             "model's state), for rl-gate")] = None,
) -> None:
    """Supported-claim rate, claims per answer, no-claim rate, abstention on unknowable and on known entities (95%
    bootstrap intervals over entities) of greedy + sampled answers, graded against the ground truth; with --probe,
    the probe's AUROC on the model's own tokens."""
    from ..api import load
    from ..jsonl import write_json
    from ..train.rl_rollouts import read_prompts
    from .rl_eval import evaluate, metrics_table

    rows, metrics = evaluate(load(model, adapter=adapter, compile="off"), read_prompts([prompts]), grader, samples,
                             max_new_tokens, known_from, probe=probe, question_probe=question_probe)
    write_json(out, rows)
    typer.echo(metrics_table({str(model): metrics}) + f"\n\n{metrics['answers']} answers; rows: {out}")


probe_app = typer.Typer(help="Hallucination probes: train, evaluate, sweep layers.", no_args_is_help=True)


def _probe_train(run) -> None:
    from .probe_recipes import run_probe_train

    typer.echo(json.dumps(run_probe_train(run), indent=2))


def _probe_sweep(run) -> None:
    from .probe_recipes import run_probe_sweep

    typer.echo(json.dumps(run_probe_sweep(run), indent=2))


def probe_eval(
    model: Annotated[Path, typer.Option("--model", "-m", help="checkpoint directory")],
    probe: Annotated[Path, typer.Option(help="probe directory")],
    data: Annotated[list[Path], typer.Option(help="annotated JSONL file(s) (repeatable)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the full report as JSON")] = False,
) -> None:
    """Evaluate a probe on annotated conversations, with the NLL, entropy and random-head baselines on the same
    spans: AUROC, AUPRC, recall at 10% FPR, best F1 and ECE at token, in-span and span-max level."""
    from .probe_recipes import run_probe_eval

    report = run_probe_eval(str(model), str(probe), [str(d) for d in data])
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    rows = [("probe", report["probe"])] + list(report["baselines"].items())
    typer.echo("| method | span-max AUROC | token AUROC | span-max AUPRC | recall@10%FPR |\n|---|---|---|---|---|")
    for name, levels in rows:
        typer.echo(f"| {name} | {levels['span_max']['auroc']:.3f} | {levels['token']['auroc']:.3f} | "
                   f"{levels['span_max']['auprc']:.3f} | {levels['span_max']['recall_at_10fpr']:.3f} |")


def probe_question(
    model: Annotated[Path, typer.Option("--model", "-m", help="checkpoint directory (the model whose knowledge is "
                                                              "probed)")],
    prompts: Annotated[list[Path], typer.Option(help="RL prompts JSONL with meta 'knowable' (lucidlm rl-prompts; "
                                                     "repeatable)")],
    out: Annotated[Path, typer.Option(help="the question probe's directory")],
    layers: Annotated[list[int] | None, typer.Option(help="blocks to sweep (repeatable; default: six across the "
                                                          "depth)")] = None,
    folds: Annotated[int, typer.Option(min=2, help="stratified folds choosing the layer and L2 strength")] = 5,
    repeats: Annotated[int, typer.Option(min=1, help="shuffled splits into folds, averaged")] = 5,
) -> None:
    """A question probe (P(IK)): from the hidden state at each question's end, before any answer, the chance the
    model cannot answer it; layer and L2 chosen by out-of-fold AUROC on these prompts."""
    from .question_probe_recipe import train_question_probe

    typer.echo(json.dumps(train_question_probe(model, prompts, out, layers or [], folds, repeats), indent=2))


def register(app: typer.Typer) -> None:
    from .probe_recipes import ProbeRun
    from .reward_recipes import RewardRun
    from .rl_pairs import RLPairsRun
    from .rl_recipes import RLRun

    reward_app.command("train")(config_command(
        RewardRun, _reward_train,
        "Train a reward model (Bradley-Terry loss) on JSONL {prompt, chosen, rejected} rows: a scalar head on the "
        "base model's last real token, the base frozen or with --lora adapters; writes the directory --out.\n\n"
        "Example: lucidlm reward train --model sft/ --data pairs.jsonl --lora --train.max-steps 200 --out rm/"))
    app.add_typer(reward_app, name="reward")

    probe_app.command("train")(config_command(
        ProbeRun, _probe_train,
        "Train a probe head on block --layer (with --lora: also LoRA on blocks 0..layer, KL-regularised) from "
        "annotated JSONL; writes the probe directory --out.\n\n"
        "Example: lucidlm probe train --model m/ --data train.jsonl --val-data test.jsonl --layer 2 --out probe/"))
    probe_app.command("sweep")(config_command(
        ProbeRun, _probe_sweep,
        "Train one head per layer in one pass and report span-max AUROC per layer (sweep.json, auroc_per_layer.png "
        "in --out)."))
    probe_app.command("eval")(probe_eval)
    probe_app.command("question")(probe_question)
    app.add_typer(probe_app, name="probe")
    app.add_typer(world_app, name="world")
    app.command("sft")(config_command(
        SFTRun, _sft,
        "Supervised fine-tuning on JSONL conversations, loss on the assistant turns only; --lora trains a "
        "PEFT-format adapter instead of every weight, --adapter bottleneck Houlsby bottleneck adapters.\n\n"
        "Example: lucidlm sft --model base/ --data chats.jsonl --lora --lora.r 8 --out adapter/"))
    app.command("dpo")(config_command(
        DPORun, _dpo,
        "Direct Preference Optimization on JSONL {prompt, chosen, rejected} rows; the reference is the starting "
        "model (frozen copy, or the adapter switched off with --lora).\n\n"
        "Example: lucidlm dpo --model sft/ --data pairs.jsonl --beta 0.1 --lora --out dpo-adapter/"))
    app.command("rl")(config_command(
        RLRun, _rl,
        "RL fine-tuning on JSONL prompts: PPO (value head, GAE, KL penalty in the reward), GRPO or DAPO (each of its "
        "four changes also a --rl option); rollouts sampled by the inference engine, scored by --reward specs "
        "(model:DIR for a reward model); --lora trains a PEFT adapter, the reference being the model with it off.\n\n"
        "Example: lucidlm rl --algo grpo --model sft/ --prompts prompts.jsonl --reward model:rm/ --lora "
        "--rl.group-size 8 --train.max-steps 200 --out rl-adapter/"))
    app.command("rl-prompts")(rl_prompts)
    app.command("rl-compare")(rl_compare)
    app.command("rl-gate")(rl_gate)
    app.command("rl-eval")(rl_eval)
    app.command("rl-pairs")(config_command(
        RLPairsRun, _rl_pairs,
        "DPO pairs from the RL prompts: --samples answers per prompt from the engine, graded against the ground "
        "truth and scored as lucidlm rl's verifiable reward (--verifiable.*); chosen = the best, rejected = the worst, "
        "prompts whose answers all tie skipped; writes JSONL that lucidlm dpo --data reads.\n\n"
        "Example: lucidlm rl-pairs -m sft/ --prompts train.jsonl --grader facts --samples 8 --out pairs.jsonl",
        short={"model": "-m"}))
    app.command("corpus")(corpus)
    tokenizer_app.command("train")(config_command(
        TokenizerRun, _tokenizer,
        "Train a byte-level BPE tokenizer (with special tokens and a ChatML template) that transformers' "
        "AutoTokenizer also loads.\n\nExample: lucidlm tokenizer train --data corpus/ --vocab-size 4000 --out tok/"))
    app.add_typer(tokenizer_app, name="tokenizer")
    app.command("pretrain")(config_command(
        PretrainRun, _pretrain,
        "Pretrain a language model on text files (packed blocks, next-token loss).\n\n"
        "--objective mlm pretrains an encoder-only masked LM (BERT) instead: --model.preset bert-base (shrunk by "
        "the --model.* options), 15% of the tokens masked, a bert checkpoint out.\n\n"
        "Every option can also come from --config run.yaml (sections: model, train).\n"
        "Example: lucidlm pretrain --data corpus/ --model.dim 256 --model.n-layers 4 --train.max-steps 500"))
