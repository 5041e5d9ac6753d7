"""The commands after training: info, import, evaluate, soup, ensemble, report, export, predict, benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from distill.cli.app import _console, app, one_of, run_guarded
from distill.errors import DistillError


SOURCE_HELP = ("A distill checkpoint (.safetensors) or its run folder; or pretrained weights: timm/NAME.TAG, "
               "hf-hub:ORG/REPO, local-dir:PATH (a timm model folder), or a weights file with --model.")
MODEL_HELP = "timm architecture of a bare weights file (e.g. regnety_160.deit_in1k); other sources name their own."


@app.command()
def info(checkpoint: str = typer.Argument(..., help=SOURCE_HELP),
         model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
         as_json: bool = typer.Option(False, "--json", help="Print the raw metadata as JSON.")) -> None:
    """Show what a checkpoint is: model, data, lineage, distillation, metrics and the config that built it."""
    from distill.weights.pretrained import open_source
    from distill.tools.summary import info_table

    def action() -> None:
        ckpt = open_source(checkpoint, model=model)
        if as_json:
            typer.echo(json.dumps(ckpt.meta, indent=2, sort_keys=True))
        else:
            info_table(ckpt)

    run_guarded(action)


@app.command("import")
def import_(source: str = typer.Argument(..., help=escape("Pretrained weights: timm/NAME.TAG, hf-hub:ORG/REPO[@REVISION], "
                                         "local-dir:PATH, or a weights file (.safetensors, .pth, .bin) with --model.")),
            model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
            out: Optional[Path] = typer.Option(None, "--out", help=escape("Also copy the checkpoint to this file or folder "
                                               "[default: only the import cache, $DISTILL_CACHE or ~/.cache/distill].")),
            to: Optional[Path] = typer.Option(None, "--to", hidden=True),
            ) -> None:
    """Import pretrained weights once as a self-describing distill checkpoint: architecture, class names, preprocessing,
    and the source with its revision or sha256. Every command also does this by itself when given such a source."""
    from distill.weights.pretrained import import_weights
    from distill.tools.summary import info_table

    def action() -> None:
        ckpt = import_weights(source, model=model, to=one_of(out, to, "--out", "--to"))
        info_table(ckpt)
        typer.echo(f"imported: {ckpt.path}")

    run_guarded(action)


@app.command()
def evaluate(
    checkpoint: str = typer.Argument(..., help=SOURCE_HELP),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    dataset: Optional[str] = typer.Option(None, help=escape("Dataset to test on, a name or hub id as for the stages "
                                          "[default: the checkpoint's].")),
    data_dir: Optional[Path] = typer.Option(None, help=escape("Local image folder to test on (its test/ or val/ split) "
                                            "[default: the checkpoint's].")),
    img_size: Optional[int] = typer.Option(None, help=escape("Evaluation resolution in pixels [default: the "
                                           "checkpoint's]; a ViT's position embeddings are resampled.")),
    res: Optional[int] = typer.Option(None, "--res", hidden=True),
    crop_pct: Optional[float] = typer.Option(None, help=escape("Test crop ratio [default: the checkpoint's].")),
    teacher: Optional[str] = typer.Option(None, help="Also report this teacher's accuracy and how often it disagrees "
                                          "(any source, as for the checkpoint)."),
    teacher_model: Optional[str] = typer.Option(None, help="timm architecture of a bare weights file given as --teacher."),
    teacher_res: str = typer.Option("student", help="Resolution the teacher reads the batch at: student, teacher or N."),
    batch_size: int = typer.Option(128, help="Batch size."),
    num_workers: int = typer.Option(2, help="Data-loading worker processes."),
    mixed_precision: str = typer.Option("no", help="Precision of the evaluation: no (fp32), bf16 or fp16; the "
                                        "accuracy says which."),
    skip_corrupt: Optional[bool] = typer.Option(None, "--skip-corrupt/--no-skip-corrupt", show_default=False,
                                                help=escape("Leave unreadable test images out [default: as the "
                                                            "checkpoint was trained, on its own data; else no].")),
    per_class: bool = typer.Option(False, "--per-class", help="Print the accuracy of each class."),
    tta: Optional[str] = typer.Option(None, "--tta", help="Test-time augmentation: flip, five-crop or multi-res; "
                                      "reports each view and the mean of their probabilities."),
    tta_res: Optional[str] = typer.Option(None, "--tta-res", help=escape("Resolutions of --tta multi-res, e.g. 24,32,40 "
                                          "[default: the model's, a fifth below and above].")),
) -> None:
    """Top-1 (and top-5, with more than 5 classes) of any checkpoint on any dataset and resolution, per head for
    token students."""
    from distill.tools.evaluate import evaluate_checkpoint

    run_guarded(lambda: evaluate_checkpoint(checkpoint, dataset=dataset, data_dir=data_dir,
                                            res=one_of(img_size, res, "--img-size", "--res"), crop_pct=crop_pct,
                                            teacher=teacher, batch_size=batch_size, num_workers=num_workers,
                                            mixed_precision=mixed_precision, per_class=per_class,
                                            skip_corrupt=skip_corrupt, model=model, teacher_model=teacher_model,
                                            teacher_res=teacher_res, tta=tta, tta_res=tta_res))


@app.command()
def soup(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoints of one architecture and one set of classes."),
    method: str = typer.Option("uniform", help="Method: uniform (average them all) or greedy (add them by held-out accuracy "
                               "while the soup's held-out accuracy does not drop)."),
    out: Path = typer.Option(Path("runs/soup"), help="Folder of the soup's model.safetensors."),
    held_out: Optional[int] = typer.Option(None, help=escape("Images of the held-out split, carved from the training "
                                           "split [default: a tenth of it].")),
    seed: int = typer.Option(0, help="Seed of the held-out split."),
    bn_images: int = typer.Option(1000, help="Training images BatchNorm statistics are re-estimated on (models with "
                                  "BatchNorm)."),
    batch_size: int = typer.Option(128, help="Batch size."),
    num_workers: int = typer.Option(2, help="Data-loading worker processes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a soup already in --out."),
) -> None:
    """Average the weights of checkpoints (a model soup); the soup is a checkpoint whose lineage lists them."""
    from distill.tools import soup as soups

    run_guarded(lambda: soups.print_soup(soups.make_soup(checkpoints, out, method=method, held_out=held_out, seed=seed,
                                                         bn_images=bn_images, batch_size=batch_size,
                                                         num_workers=num_workers, overwrite=overwrite)))


@app.command()
def ensemble(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoints with the same classes; any architectures and "
                                             "resolutions."),
    mean: str = typer.Option("arith", help="Mean: arith (of the probabilities) or geo (their geometric mean)."),
    out: Optional[Path] = typer.Option(None, help="Folder to save the predictions in (predictions.safetensors, "
                                       "ensemble.json)."),
    save: Optional[Path] = typer.Option(None, "--save", hidden=True),
    dataset: Optional[str] = typer.Option(None, help=escape("Dataset to test on [default: the first checkpoint's].")),
    data_dir: Optional[Path] = typer.Option(None, help=escape("Image folder to test on [default: the first "
                                            "checkpoint's].")),
    batch_size: int = typer.Option(128, help="Batch size."),
    num_workers: int = typer.Option(2, help="Data-loading worker processes."),
    mixed_precision: str = typer.Option("no", help="Precision: no (fp32), bf16 or fp16."),
) -> None:
    """Evaluate checkpoints together, each with its own preprocessing: every member's top-1 and the ensemble's."""
    from distill.tools import ensemble as ens
    from distill.tools.inference import check_precision

    def action() -> None:
        check_precision(mixed_precision)
        save_to = one_of(out, save, "--out", "--save")
        result = ens.evaluate_ensemble(checkpoints, mean=mean, dataset=dataset, data_dir=data_dir, batch_size=batch_size,
                                       num_workers=num_workers, mixed_precision=mixed_precision, save=save_to)
        ens.print_ensemble(result, save_to)

    run_guarded(action)


@app.command()
def report(
    workdir: Path = typer.Argument(Path("runs"), help="The work folder whose runs to show."),
    out: Optional[Path] = typer.Option(None, help=escape("Folder of the page and its figures [default: WORKDIR/report].")),
) -> None:
    """One self-contained HTML page of a work folder (PNG figures beside it, opens offline): training curves,
    lineage, accuracy against size and throughput, teacher agreement, per-class accuracy, FixRes before/after."""
    from distill.tools.report import write_report

    def action() -> None:
        path = write_report(workdir, out)
        _console().print(f"report: {escape(str(path))}", soft_wrap=True)

    run_guarded(action)



@app.command()
def export(
    checkpoint: str = typer.Argument(..., help=SOURCE_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write config.json and model.safetensors into "
                                       "(created if needed); required."),
    to: Optional[Path] = typer.Option(None, "--to", hidden=True),
    onnx: bool = typer.Option(False, "--onnx", help=escape("Also write model.onnx (class probabilities; a token student's two heads "
                              "fused as its accuracy was measured), checked against torch with ONNX Runtime: pip install "
                              "'distill[onnx]'.")),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
) -> None:
    """Write a timm model folder: timm.create_model("local-dir:DIR", pretrained=True) loads it with the same logits, and
    huggingface_hub can upload it as it is."""
    from distill.tools.export import ONNX_TOLERANCE, export_checkpoint
    from distill.weights.pretrained import open_source

    def action() -> None:
        folder = one_of(out, to, "--out", "--to")
        if folder is None:
            raise DistillError("Give the folder to write with --out DIR.")
        report = export_checkpoint(open_source(checkpoint, model=model), folder, onnx=onnx)
        console = _console()
        console.print(f"timm folder: {escape(report['folder'])} (reloaded with timm: logits identical)", soft_wrap=True)
        if report.get("fusion_note"):
            console.print(f"note: {escape(report['fusion_note'])}.", soft_wrap=True)
        if onnx:
            console.print(f"ONNX: {escape(report['onnx'])} (ONNX Runtime against torch: largest probability difference "
                          f"{report['onnx_max_difference']:.2g}, tolerance {ONNX_TOLERANCE:g})", soft_wrap=True)

    run_guarded(action)


@app.command()
def predict(
    checkpoint: str = typer.Argument(..., help=SOURCE_HELP),
    inputs: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) or glob patterns."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    top_k: int = typer.Option(5, "--top-k", help="Classes to report per image."),
    tta: Optional[str] = typer.Option(None, "--tta", help="Test-time augmentation: flip (mean of the image's and its "
                                      "mirror image's probabilities)."),
    fmt: str = typer.Option("csv", "--format", help="Output format: csv or json."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here instead of standard output."),
    output: Optional[Path] = typer.Option(None, "--output", hidden=True),
    batch_size: int = typer.Option(64, help="Images per batch."),
    num_workers: int = typer.Option(2, help="Data-loading workers."),
    mixed_precision: str = typer.Option("no", help="Precision: no (fp32), bf16 or fp16."),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help="Skip unreadable images (counted) instead of stopping."),
) -> None:
    """The top-k classes of images with their probabilities, batched on the device (a token student's heads fused as its
    accuracy was measured)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from distill.tools import predict as prediction
    from distill.weights.pretrained import open_source

    def action() -> None:
        write_to = one_of(out, output, "--out", "--output")
        ckpt = open_source(checkpoint, model=model)
        files = prediction.expand_inputs(inputs)
        errors = Console(stderr=True, highlight=False)
        bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=errors,
                       transient=True, disable=not errors.is_terminal)
        with bar:
            task = bar.add_task("predict", total=len(files))
            records, skipped = prediction.predict(ckpt, files, top_k=top_k, tta=tta, batch_size=batch_size,
                                                  num_workers=num_workers, mixed_precision=mixed_precision,
                                                  skip_corrupt=skip_corrupt, progress=lambda n: bar.advance(task, n))
        prediction.write_output(prediction.render(records, fmt, top_k), write_to)
        if skipped:
            errors.print(f"skipped {len(skipped)} unreadable image(s), e.g. {escape(skipped[0])}", soft_wrap=True)

    run_guarded(action)


@app.command()
def benchmark(
    models: Optional[list[str]] = typer.Argument(None, help="timm model names (deit_tiny_patch16_224, regnety_002, ...) "
                                                 "or distill checkpoints (none: with --data, the loader alone)."),
    batch_size: int = typer.Option(64, help="Batch size of every measurement."),
    img_size: Optional[int] = typer.Option(None, help=escape("Resolution in pixels (a checkpoint's ViT is resampled to "
                                           "it) [default: 224].")),
    res: Optional[int] = typer.Option(None, "--res", hidden=True),
    steps: int = typer.Option(10, help="Timed steps per measurement, after the warm-up steps."),
    warmup: int = typer.Option(3, help="Untimed steps before each measurement."),
    mixed_precision: str = typer.Option("no", help="Precision: no, bf16 or fp16 (GPU)."),
    teacher: str = typer.Option("regnety_002", help="Teacher of the on-the-fly distillation step: a timm name or a "
                                "checkpoint."),
    training: bool = typer.Option(True, "--training/--no-training", help="Also time training steps, not only inference."),
    data_dir: Optional[Path] = typer.Option(None, help="Image folder for the measurements with data loading "
                                            "(default: the embedded digits)."),
    num_workers: int = typer.Option(2, help="Data-loading workers of the measurements with data loading."),
    compile: bool = typer.Option(False, "--compile", help="Hand the models and the teacher to torch.compile."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", show_default=False,
                                                 help="Channels-last memory format for convolutional models; by default "
                                                 "as the training stages choose (on a CPU, and on a GPU with "
                                                 "mixed precision)."),
    onednn_linear: Optional[bool] = typer.Option(None, "--onednn-linear/--no-onednn-linear", show_default=False,
                                                 help="Compute fp32 linear layers on a CPU with oneDNN; by default as the "
                                                 "training stages choose (on an AVX-512 CPU not made by Intel)."),
    data: Optional[str] = typer.Option(None, help="Also report the input pipeline alone on this data (a dataset name "
                                       "or an image folder): CPU ms per image by part of DeiT's training preprocessing, "
                                       "images/s per core, bytes per image to the device, cores a GPU needs."),
    step_rate: Optional[float] = typer.Option(None, help=escape("With --data: the training step's images/s per GPU to size "
                                              "the cores for [default: each model's measured step, else 1000].")),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write the table as CSV."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the table as JSON."),
) -> None:
    """Throughput, parameters, GFLOPs and peak memory of models (the paper's Table 3.5), inference and training:
    the student alone, with a teacher on the fly, with a cached teacher; with data loading and without. With --data,
    the input pipeline alone."""
    from distill.tools import benchmark as bench

    def action() -> None:
        if mixed_precision not in ("no", "bf16", "fp16"):
            raise DistillError(f"--mixed-precision must be one of no, bf16, fp16, not '{mixed_precision}'.")
        if not models and data is None:
            raise DistillError("Name a model to benchmark (a timm name or a checkpoint), or pass --data for the loader alone.")
        if (step_rate is not None) and data is None:
            raise DistillError("--step-rate sizes the cores for the loader of --data; pass --data too.")
        if csv_path is not None and not models:
            raise DistillError("--csv writes the models' table; with --data alone, --json writes the loader's report.")
        if step_rate is not None and step_rate <= 0:
            raise DistillError("--step-rate is images per second of one GPU's step, a positive number.")
        size = one_of(img_size, res, "--img-size", "--res")
        settings = bench.BenchSettings(batch_size=batch_size, res=224 if size is None else size, steps=steps, warmup=warmup,
                                       mixed_precision=mixed_precision, teacher=teacher, training=training,
                                       data_dir=data_dir, num_workers=num_workers, compile=compile,
                                       channels_last=channels_last, onednn_linear=onednn_linear)
        rows = bench.run(models or [], settings)
        if rows:
            _console().print(bench.table(rows))
        loader = None
        if data is not None:
            rates = {row["model"]: row["train_alone_img_s"] for row in rows if "train_alone_img_s" in row}
            loader = bench.loader_report(data, settings, {"--step-rate": step_rate} if step_rate else rates or None)
            _console().print(bench.loader_table(loader), soft_wrap=True)
        bench.save(rows, csv_path, json_path, loader)

    run_guarded(action)
