"""The kvstress command line: declarations, parsing and calls; the measuring lives in the schedules.

Every measuring command (sweep, ppl, needle, batch, compare) takes the shared options
of config.RunConfig through one decorator, builds its config, and hands a schedule to
run.execute. Nothing here loads torch or transformers: the options are checked and the
config built first, and only then is the command's measuring module imported. Every
default is the config dataclass's (`_default`). Expected failures (any errors.KvstressError) print one line on stderr that
names the fix and exit with code 2; `--debug` shows the traceback. A method that fails while
it runs is a failed point in the results, the other methods run, and the command exits with 3
at the end. Ctrl-C exits with 130
after saying how to resume, SIGTERM (a scheduler ending the job) the same way with 143:
from the moment a command starts (control.stop_on_interrupt; at once until measuring starts).
"""

import functools
import inspect
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import typer

from .config import (
    BatchConfig,
    ConfigError,
    NeedleConfig,
    PplConfig,
    RunConfig,
    SweepConfig,
    build_methods,
    launch_problem,
    parse_batch_sizes,
    parse_buckets,
    parse_depths,
    parse_length,
    parse_lengths,
)
from .control import stop_on_interrupt
from .errors import KvstressError, RankLost, RunInterrupted, StopNow
from .ruler import ANSWER_TOKENS
from .sizes import parse_size
from .spec import all_methods
from .tables import console, notify, progress_bars

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Long-context stress tests for KV-cache compression policies (`kvstress policies` lists them).",
)
USAGE_EXIT = 2
FAILED_EXIT = 3  # a method failed while it ran; the others ran to the end


@contextmanager
def user_errors(debug: bool):
    """Turn expected failures into one line on stderr (from rank 0 alone under torchrun) and exit
    code 2; an interrupt into 130 (Ctrl-C) or 143 (SIGTERM)."""
    try:
        yield
    except KvstressError as error:
        if debug:
            raise
        # Under torchrun every rank meets the same mistake: rank 0 says it once. A lost rank
        # is each rank's own news.
        if os.environ.get("RANK", "0") == "0" or isinstance(error, RankLost):
            console.print(f"[bold red]error:[/] {error}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(USAGE_EXIT) from None
    except RunInterrupted as interrupted:
        console.print(f"[yellow]interrupted:[/] {interrupted}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(interrupted.exit_code) from None
    except StopNow as stopped:  # outside a run (compare loading its model): no point was in flight
        console.print(f"[yellow]interrupted:[/] stopped by {stopped}; what was measured is saved", markup=True,
                      highlight=False, soft_wrap=True)
        raise typer.Exit(stopped.exit_code) from None


def _option(default, *names: str, help: str):
    return typer.Option(default, *names, help=help)


def _defaults(config: type[RunConfig]) -> dict:
    """Each option's default: the config dataclass's, the one place it is written."""
    return {name: field.default for name, field in config.__dataclass_fields__.items()}


SWEEP, PPL, NEEDLE, BATCH = map(_defaults, (SweepConfig, PplConfig, NeedleConfig, BatchConfig))
_CONFIG = object()  # a shared option whose default is RunConfig's (filled in below)


def _tokens_text(n: int) -> str:
    """A token count as the options spell it: 4096 → 4k."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


# The options every measuring command shares: (name, type, typer option). A command
# decorated with @run_options receives them as one dict, `run`.
_SHARED = [
    ("method", list[str], _option(["all"], "--method", "-m", help="Policy names or spec strings such as h2o_4_32_256 "
                                  "(`kvstress policies` lists them), or all: " + ", ".join(all_methods(plugins=False)) +
                                  " (repeatable, "
                                  "or comma-separated).")),
    ("capacity", int | None, _option(None, help="Tokens a compressed cache holds (default 256).")),
    ("sink", int | None, _option(None, help="Attention-sink tokens kept from the start (default 4).")),
    ("window", int | None, _option(None, help="The recent window of policies that keep one (default capacity/8).")),
    ("model", str, _option(_CONFIG, help="HF id, local folder, smollm2-135m (bundled), random:<arch> or "
                           "tiny-random.")),
    ("dataset", str | None, _option(_CONFIG, help="pg19, wikitext, shakespeare (bundled) or a text file; default "
                                       "pg19, else shakespeare.")),
    ("book", str | None, _option(_CONFIG, help="A PG-19 book: its index in the test split, or part of its title "
                                 "(default: the first book long enough for the run).")),
    ("device", str, _option(_CONFIG, help="auto, cpu or cuda.")),
    ("dtype", str, _option(_CONFIG, help="auto (bf16 on GPU, fp32 on CPU), float32, float16 or bfloat16.")),
    ("positions", str, _option(_CONFIG, help="Compressed caches: original (absolute) or shifted (positions "
                               "inside the cache).")),
    ("seed", int, _option(_CONFIG, help="Seeds random weights, and the needles' haystacks and numbers.")),
    ("lazy", int, _option(_CONFIG, help="Let compressed caches run over capacity by this many tokens, then evict them "
                          "at once.")),
    ("max_memory", str | None, _option(None, help="Memory budget (e.g. 8GB) that counts as out-of-memory when "
                                          "exceeded.")),
    ("compile", bool, _option(_CONFIG, "--compile", help="Compile the compressed caches' single-token steps "
                              "(torch.compile; one CUDA graph per step on GPU). The full cache stays eager.")),
    ("tp", int, _option(_CONFIG, "--tp", help="Tensor-parallel ranks: the model sharded by heads over N processes "
                        "(torchrun --nproc-per-node N -m kvstress ... --tp N); gloo on CPU, NCCL on CUDA.")),
    ("device_map", str | None, _option(_CONFIG, "--device-map", help="Not supported (compressed caches keep each "
                                          "layer's buffers on one device): use --tp to use several cards.")),
    ("force", bool, _option(_CONFIG, "--force", help="Overwrite the results file if it exists.")),
    ("resume", bool, _option(_CONFIG, "--resume", help="Continue an interrupted run in its results file; what it "
                             "holds is kept, not measured again; refused if the config differs.")),
    ("isolate", bool, _option(_CONFIG, "--isolate", help="Run each method in a child process, so a hard crash is "
                              "recorded and the run goes on.")),
    ("debug", bool, _option(_CONFIG, "--debug", help="Show tracebacks instead of one-line errors.")),
]


for _name, _, _info in _SHARED:
    if _info.default is _CONFIG:
        _info.default = _defaults(RunConfig)[_name]


def run_options(command):
    """Add the shared options to `command`'s signature; it receives them as `run: dict`."""
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "run"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
              for name, kind, option in _SHARED]

    @functools.wraps(command)
    def wrapper(**kwargs):
        run = {name: kwargs.pop(name) for name, _, _ in _SHARED}
        with stop_on_interrupt(at_once=True), user_errors(run["debug"]):  # Ctrl-C, SIGTERM: exit 130, 143
            return command(**kwargs, run=run)

    wrapper.__signature__ = inspect.Signature(own + shared)
    wrapper.__annotations__ = {**command.__annotations__, **{name: kind for name, kind, _ in _SHARED}}
    return wrapper


def shared_config(run: dict, *, methods=None) -> dict:
    """The shared options as RunConfig fields; a launch that does not match --tp (torchrun) is
    refused here, before any results file is opened."""
    problem = launch_problem(run["tp"])
    if problem:
        raise ConfigError(problem)
    fields = {key: run[key] for key in ("model", "dataset", "book", "device", "dtype", "positions", "seed", "lazy", "compile",
                                        "tp", "device_map", "force", "resume", "isolate", "debug")}
    fields["methods"] = methods or build_methods(run["method"], run["capacity"], run["sink"], run["window"])
    if run["max_memory"] is not None:
        try:
            fields["max_memory"] = parse_size(run["max_memory"])
        except ValueError as error:
            raise ConfigError(f"--max-memory: {error}") from None
    return fields


def _tokens(text: str, option: str) -> int:
    try:
        return parse_length(text)
    except ConfigError as error:
        raise ConfigError(f"{option}: {error}") from None


def _quiet_rank(tp: int) -> bool:
    """Under torchrun with --tp only rank 0 talks, prints the tables and writes the files."""
    return tp > 1 and os.environ.get("RANK", "0") != "0"


def _execute(schedule):
    from .run import execute

    quiet = _quiet_rank(schedule.config.tp)
    with nullcontext() if quiet else progress_bars() as progress:
        result = execute(schedule, progress=progress)
    if quiet:
        raise typer.Exit(FAILED_EXIT if result.failed else 0)
    return result


def _results_line(out: Path, then: str, failed: list[dict]) -> None:
    """The results file's line; then, if any point of this run failed, exit 3 (after every
    other method was measured and the tables printed)."""
    console.print(f"results: {out}   {then} {out}")
    _exit_if_failed(failed)


def _exit_if_failed(failed: list[dict]) -> None:
    if failed:
        methods = ", ".join(dict.fromkeys(record["method"] for record in failed))
        console.print(f"[bold red]failed:[/] {methods} (see the lines above; --debug shows the traceback); the other "
                      "methods' results are complete, and once the cause is fixed the same command plus --resume "
                      "measures what failed", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(FAILED_EXIT)


@app.command()
@run_options
def sweep(
    lengths: str = typer.Option(
        ",".join(map(_tokens_text, SWEEP["lengths"])),
        help="Checkpoint context lengths, increasing: 2k,4k or 2048,4096.",
    ),
    chunk: int = typer.Option(SWEEP["chunk"], help="Prefill chunk size in tokens."),
    decode_steps: int = typer.Option(SWEEP["decode_steps"], help="Single-token steps at each checkpoint (1 warm-up/TTFT, "
                                     "1 attention "
                                     "probe, the rest timed)."),
    batch_size: int = typer.Option(SWEEP["batch_size"], help="Sequences per batch, each a different segment of the text."),
    out: Path = typer.Option(SWEEP["out"], "--out", "-o", help="Results file (JSON), written as the run goes."),
    *, run: dict,
) -> None:
    """Stream ever-longer text through each cache; record memory, TTFT, TPOT and perplexity per length."""
    config = SweepConfig(**shared_config(run), lengths=parse_lengths(lengths), chunk=chunk, decode_steps=decode_steps,
                         batch_size=batch_size, out=out)
    from .sweep import SweepSchedule
    from .tables import print_sweep

    result = _execute(SweepSchedule(config, notify=notify))
    print_sweep(result.records)
    _results_line(out, "plot: kvstress plot", result.failed)


@app.command()
@run_options
def ppl(
    tokens: str = typer.Option(_tokens_text(PPL["tokens"]), help="Tokens of text to score (e.g. 4096 or 4k)."),
    chunk: int = typer.Option(PPL["chunk"], help="Tokens per forward: 1 is exact streaming perplexity; more is faster but an "
                              "approximation (tokens in a chunk see each other past the cache's capacity)."),
    buckets: str | None = typer.Option(None, help="Length bucket edges, e.g. 1k,2k,4k; default 1k, 2k, 4k ... up "
                                          "to --tokens."),
    books: str | None = typer.Option(None, help="Score several PG-19 books, each one sample, and report the mean and "
                                     "spread: a count (5: the first five long enough) or indices/titles (0,7,moby)."),
    out: Path = typer.Option(PPL["out"], "--out", "-o", help="Results file (JSON, kind ppl), written after "
                             "each bucket."),
    *, run: dict,
) -> None:
    """Streaming perplexity of a text under each cache: every token scored through the compressed cache."""
    count = _tokens(tokens, "--tokens")
    edges, note = parse_buckets(buckets, count)
    config = PplConfig(**shared_config(run), tokens=count, buckets=edges, chunk=chunk, books=books, out=out)
    from .perplexity import PplSchedule
    from .tables import print_ppl

    result = _execute(PplSchedule(config, bucket_note=note, notify=notify))
    print_ppl(config, result.records, result.events, result.text.name)
    _results_line(out, "table: kvstress report", result.failed)


@app.command()
@run_options
def needle(
    task: str = typer.Option(NEEDLE["task"], help="What to hide and ask: needle (one magic number), multikey (RULER's "
                             "multi-key needle: four keys, one asked) or vartrack (RULER's variable tracking: every "
                             "name bound to a value through a chain of assignments)."),
    lengths: str = typer.Option(",".join(map(_tokens_text, NEEDLE["lengths"])), help="Prompt lengths in tokens (haystack + "
                                "needle + question), "
                                "increasing."),
    depths: str = typer.Option(",".join(f"{d:g}" for d in NEEDLE["depths"]), help="Where the needle sits, in percent of "
                               "the haystack."),
    needles: int = typer.Option(NEEDLE["needles"], help="Trials (needles) per length and depth, each its own haystack "
                                "and number."),
    chunk: int = typer.Option(NEEDLE["chunk"], help="Prefill chunk size; the question always gets its own forward."),
    max_new_tokens: int | None = typer.Option(NEEDLE["max_new_tokens"], help="Most tokens generated per answer "
                                              "(default by task: " + ", ".join(f"{t} {n}" for t, n in ANSWER_TOKENS.items()) +
                                              "; numbers stop after the first number, vartrack at the answer's "
                                              "line end)."),
    chat: bool = typer.Option(NEEDLE["chat"], "--chat", help="Wrap the question in the tokenizer's chat template."),
    out: Path = typer.Option(NEEDLE["out"], "--out", "-o", help="Results file (JSON, kind needle), written "
                             "after each cell."),
    *, run: dict,
) -> None:
    """Needle in a haystack: hide a number (or a RULER task's keys or chain) at each depth, ask for it, score the answers."""
    config = NeedleConfig(**shared_config(run), task=task, lengths=parse_lengths(lengths), depths=parse_depths(depths),
                          needles=needles, chunk=chunk, max_new_tokens=max_new_tokens, chat=chat, out=out)
    from .events import needle_cells
    from .needle import NeedleSchedule
    from .tables import print_needle

    result = _execute(NeedleSchedule(config, notify=notify))
    print_needle(config, needle_cells({"events": result.events}))
    _results_line(out, "plot: kvstress plot", result.failed)


@app.command()
@run_options
def batch(
    batch_sizes: str = typer.Option(",".join(map(str, BATCH["batch_sizes"])), help="Batch sizes to try in order, "
                                    "increasing, until OOM."),
    length: str = typer.Option(_tokens_text(BATCH["length"]), help="Context length of every sequence (e.g. 4096 or 4k)."),
    max_batch: int | None = typer.Option(BATCH["max_batch"], help="Largest batch to try; with --find-max-batch the search's "
                                            "bound (default: the largest --batch-sizes)."),
    find_max_batch: bool = typer.Option(BATCH["find_max_batch"], "--find-max-batch", help="Find the largest batch that fits: "
                                        "doubling "
                                        "until OOM, then binary search."),
    chunk: int = typer.Option(BATCH["chunk"], help="Prefill chunk size in tokens."),
    decode_steps: int = typer.Option(BATCH["decode_steps"], help="Single-token steps after the context (1 warm-up, "
                                     "1 attention probe, "
                                     "the rest timed)."),
    out: Path = typer.Option(BATCH["out"], "--out", "-o", help="Results file (JSON, kind batch), written after "
                             "each point."),
    *, run: dict,
) -> None:
    """Decode throughput (tok/s over all sequences) and peak memory per batch size; the largest batch that fits."""
    config = BatchConfig(**shared_config(run), batch_sizes=parse_batch_sizes(batch_sizes),
                         length=_tokens(length, "--length"), max_batch=max_batch, find_max_batch=find_max_batch,
                         chunk=chunk, decode_steps=decode_steps, out=out)
    from .batch import BatchSchedule
    from .events import largest_batches
    from .tables import print_batch

    result = _execute(BatchSchedule(config, notify=notify))
    print_batch(config, result.records, largest_batches(result.events))
    _results_line(out, "plot: kvstress plot", result.failed)


@app.command()
@run_options
def compare(
    datasets: str = typer.Option("pg19,wikitext", help="Comma-separated: pg19, wikitext, shakespeare or text files."),
    tokens: str = typer.Option(_tokens_text(PPL["tokens"]), help="Tokens of each text to score."),
    chunk: int = typer.Option(PPL["chunk"], help="Tokens per forward: 1 is exact; more is faster but an approximation."),
    buckets: str | None = typer.Option(None, help="Length bucket edges, e.g. 1k,2k,4k."),
    books: str | None = typer.Option(None, help="PG-19: several books, each one sample (see kvstress ppl --books)."),
    out_dir: Path = typer.Option(Path("compare"), "--out-dir", help="Folder for one results file per dataset."),
    format: str = typer.Option("markdown", "--format", "-f", help="Table format: markdown, csv or json."),
    *, run: dict,
) -> None:
    """The seed experiment's six configurations (or --method) on each dataset, then the comparison table."""
    names = [name.strip() for name in datasets.split(",") if name.strip()]
    count = _tokens(tokens, "--tokens")
    edges, note = parse_buckets(buckets, count)
    chosen = None if run["method"] == ["all"] else build_methods(run["method"], run["capacity"], run["sink"],
                                                                   run["window"])
    from .perplexity import compare_methods, run_compare
    from .report import build_report, render

    config = PplConfig(**shared_config(run, methods=chosen or compare_methods()), tokens=count, buckets=edges,
                       chunk=chunk, books=books)
    quiet = _quiet_rank(config.tp)
    with nullcontext() if quiet else progress_bars() as progress:
        result = run_compare(names, config, bucket_note=note, out_dir=out_dir, progress=progress,
                             notify=(lambda message: None) if quiet else notify)
    if quiet:  # rank 0 reads the files it wrote and prints the table
        raise typer.Exit(FAILED_EXIT if result.failed else 0)
    sys.stdout.write(render(build_report(result.written, datasets=names), format))
    console.print(f"results: {', '.join(map(str, result.written))}")
    _exit_if_failed(result.failed)


@app.command()
@run_options
def frontier(
    budgets: str = typer.Option("0.0625,0.125,0.25,0.5", help="KV budgets, increasing: tokens (128,256,512) or "
                                "fractions of the full cache's bytes at --tokens (0.1,0.25,0.5), never mixed. Each "
                                "policy's capacity (quant: its full-precision residual) is the budget."),
    tokens: str = typer.Option("4k", help="The run's length: tokens of each text scored, and the context of the "
                               "decode-cost steps."),
    ppl_chunk: int = typer.Option(1, "--ppl-chunk", help="Tokens per perplexity forward: 1 is exact; more is faster "
                                  "but an approximation (recorded as chunked)."),
    chunk: int = typer.Option(512, help="Prefill chunk size of the needles' prompts and the decode-cost context."),
    books: str | None = typer.Option(None, help="Several books, each one sample, perplexity pooled and mean ± SD: a "
                                     "count or indices/titles; --dataset pg19 (PG-19's) or shakespeare (the plays)."),
    needle_lengths: str = typer.Option("1k,2k", help="Needle prompt lengths in tokens, increasing."),
    depths: str = typer.Option("0,50,100", help="Where the needle sits, in percent of the haystack."),
    needles: int = typer.Option(1, help="Trials per needle length and depth."),
    tasks: str = typer.Option("needle", help="Retrieval tasks, comma-separated: needle, and RULER's multikey "
                              "(several keys, one asked) and vartrack (a chain of assignments)."),
    max_new_tokens: int | None = typer.Option(None, help="Most tokens generated per answer (default: each task's)."),
    decode_steps: int = typer.Option(16, help="Single-token steps per cache at --tokens (the first a warm-up), taken "
                                     "in turns with StreamingLLM's at the same budget."),
    out: Path = typer.Option(Path("frontier.json"), "--out", "-o", help="Results file (JSON, kind frontier), "
                             "written as the run goes."),
    *, run: dict,
) -> None:
    """Every policy at several KV budgets: perplexity, retrieval and decode cost against the bytes the cache holds."""
    from .config import FrontierConfig, frontier_plan, parse_budgets

    if run["capacity"] is not None:
        raise ConfigError("--capacity: in a frontier the budgets set every policy's capacity; drop --capacity and "
                          "give --budgets")
    count = _tokens(tokens, "--tokens")
    chosen = parse_budgets(budgets)
    plan = frontier_plan(run["method"], chosen, count, sink=run["sink"], window=run["window"])
    config = FrontierConfig(**shared_config(run, methods=tuple(point.method for point in plan)),
                            policies=tuple(run["method"]), budgets=chosen, sink=run["sink"], window=run["window"],
                            tokens=count, ppl_chunk=ppl_chunk, chunk=chunk, books=books,
                            needle_lengths=parse_lengths(needle_lengths, "--needle-lengths"), depths=parse_depths(depths),
                            needles=needles, tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                            max_new_tokens=max_new_tokens, decode_steps=decode_steps, out=out)
    from .frontier import FrontierSchedule
    from .report import frontier_report, render
    from .tables import print_frontier

    result = _execute(FrontierSchedule(config, notify=notify))
    print_frontier(out)
    sys.stdout.write(render(frontier_report(out), "markdown"))
    _results_line(out, "plot: kvstress plot", result.failed)


@app.command()
def policies() -> None:
    """Every registered cache policy (built in, or from a plugin): its spec form, parameters and description."""
    from .spec import describe_policies
    from .tables import print_policies

    print_policies(describe_policies())


@app.command()
def plot(
    results: list[Path] = typer.Argument(..., help="One or more results files from kvstress."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Figure path (.png, .pdf or .svg); default: next to "
                                       "the first results file."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    """Draw memory, time per token and perplexity against context length from results files."""
    from .plot import plot_results

    with user_errors(debug):
        written = plot_results(results, out or results[0].with_suffix(".png"))
    console.print(f"figure: {written}")


@app.command()
def report(
    results: list[Path] = typer.Argument(..., help="Results files (ppl and sweep) to merge into one table."),
    format: str = typer.Option("markdown", "--format", "-f", help="markdown, csv or json."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    """A comparison table (one row per method) from results files: perplexity, time and memory."""
    from .report import build_report, render

    with user_errors(debug):
        text = render(build_report(results), format)
    sys.stdout.write(text)
