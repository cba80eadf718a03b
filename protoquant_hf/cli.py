"""The `protoquant` command line: a thin layer over the Python API (`protoquant_hf.training`, `protoquant_hf.explain`).

    protoquant train --help
    protoquant train                      # the embedded default: bundled Lite0 + Animal-MNIST
    python -m protoquant_hf train ...     # the same
    protoquant explain IMAGE... --model DIR --output_dir OUT
    protoquant gallery --model DIR --dataset DATA --output_dir NEW
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import HfArgumentParser

TRAIN_DESCRIPTION = """Train a ProtoQuant classifier in two stages on a frozen backbone:
step 0 (stage-1 head: the checkpoint's own or a linear probe), stage 1 (concept codebook, k-means
initialised), stage 2 (sparse non-negative concept->class head), optional top-k sparsification.
The defaults run the embedded offline job: bundled EfficientNet-Lite0 + Animal-MNIST at 128 px.
Writes OUTPUT_DIR with the model, its image processor, training_summary.json and train_log.jsonl."""


def format_summary(summary, output_dir: str, check: dict | None = None) -> str:
    """The end-of-run table of a `TrainingSummary`."""
    data, phases = summary.dataset, summary.phases
    rows = [("dataset", f"{data.name} ({data.train_size} train / {data.test_size} test, {data.image_size} px)")]
    if data.test_split != "the dataset's test split":
        rows.append(("test split", data.test_split))
    if summary.linear_probe_accuracy is not None:
        rows.append(("linear probe accuracy (dense reference)", f"{summary.linear_probe_accuracy:.4f}"))
    if "stage1" in phases:
        rows.append(("stage-1 quantized accuracy", f"{phases['stage1'].accuracy:.4f}"))
    if summary.accuracy is not None:
        ratio = f"  ({summary.accuracy_vs_linear_probe:.3f} x probe)" if summary.accuracy_vs_linear_probe else ""
        free = summary.arguments.get("training", {}).get("concept_training") == "free"
        rows.append(("free-prototype baseline accuracy" if free else "ProtoQuant accuracy", f"{summary.accuracy:.4f}{ratio}"))
    if summary.num_concepts is not None:
        dead = f"  (dead after stage 1: {phases['stage1'].usage.dead_concepts})" if "stage1" in phases else ""
        rows.append(("concepts (K)", f"{summary.num_concepts}{dead}"))
    if summary.concepts_per_class is not None:
        rows += [(label, f"mean {mean:.1f}, max {maximum}") for _, label, mean, maximum in summary.concepts_per_class.figures()]
    if summary.grounding is not None:
        rows.append(("grounding (max cosine to a training feature)", f"mean {summary.grounding.mean:.3f}, min {summary.grounding.min:.3f}"))
    rows.append(("time", f"{summary.total_s:.0f} s (feature extraction {summary.feature_extraction_s:.0f} s)"))
    if check is not None:
        rows.append(("reloaded with from_pretrained + pipeline", f"{check['agreement']:.0%} agreement on {check['num_images']} test images"))
    rows.append(("output", output_dir))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name.ljust(width)}  {value}" for name, value in rows)


def train(argv: list[str]) -> int:
    from accelerate import PartialState

    from .training import DataArguments, ModelArguments, ProtoQuantTrainingArguments, train_protoquant
    from .job import check_saved_model

    parser = HfArgumentParser(
        (DataArguments, ModelArguments, ProtoQuantTrainingArguments),
        prog="protoquant train",
        description=TRAIN_DESCRIPTION,
    )
    try:
        data_args, model_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # argument validation in __post_init__
        parser.error(str(error))
    try:
        try:
            summary = train_protoquant(data_args, model_args, training_args)
        except (ValueError, ImportError, FileNotFoundError, OSError) as error:
            print(f"protoquant train: error: {error}", file=sys.stderr)
            return 2
        if PartialState().is_main_process:
            check = check_saved_model(training_args.output_dir, data_args)
            print("\nProtoQuant training summary")
            print(format_summary(summary, training_args.output_dir, check))
        return 0
    finally:
        # This process owns the process group `accelerate launch` set up: a gloo group left to interpreter teardown
        # can abort the process after its work is done ("terminate called without an active exception").
        PartialState().destroy_process_group()


EXPLAIN_DESCRIPTION = """Explain a ProtoQuant model's decisions on your images ("this looks like that"): for each image, the
predicted class (or --class), its top concepts with presence score x weight = contribution and their share of the
logit (contributions add up exactly to the logit: the model has no bias), where in the image each concept was
found (heatmap and box), and the training patches each concept stands for (when the model folder has a gallery;
`protoquant gallery` builds one). Writes one PNG per image and explanations.json into a new OUTPUT_DIR."""

GALLERY_DESCRIPTION = """Build the codebook gallery of a trained model: one pass over its training data finds each
concept's nearest training patches, which are stored with the model (gallery/, a few MB) so explanations can show
them without the data. Also draws the gallery's first page, one sheet per class and the codebook overview into
figures/. The model folder is never changed silently: write a copy with --output_dir, or pass --in_place."""


def explain_command(argv: list[str]) -> int:
    from .explanation_protoquant import BOX_RULES

    parser = argparse.ArgumentParser(prog="protoquant explain", description=EXPLAIN_DESCRIPTION)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (or http(s) URLs) to explain")
    parser.add_argument("--model", required=True, help="a trained ProtoQuant model folder")
    parser.add_argument("--output_dir", required=True, help="new folder for the figures and explanations.json")
    parser.add_argument("--top_k", type=int, default=3, help="concepts shown per image (default: 3)")
    parser.add_argument("--class", dest="target", default=None, help="explain this class (a label) instead of the prediction")
    parser.add_argument(
        "--box_rule", choices=BOX_RULES, default=None,
        help="how a concept's peak becomes a box: patch (token models, exact), pipnet (convnets; the default for "
        "them) or protopnet (around the top 5%% of the upsampled map)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if an earlier `protoquant explain` wrote it")
    args = parser.parse_args(argv)
    from .explain.model_folder import explain_to_folder

    try:
        figures = explain_to_folder(
            args.images, args.model, args.output_dir, top_k=args.top_k, target=args.target, box_rule=args.box_rule,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"protoquant explain: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {len(figures)} explanation figure(s) and explanations.json to {args.output_dir}")
    return 0


def gallery_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="protoquant gallery", description=GALLERY_DESCRIPTION)
    parser.add_argument("--model", required=True, help="a trained ProtoQuant model folder")
    parser.add_argument("--dataset", required=True, help="its training data: a bundled name, an image folder or a Hub dataset id")
    parser.add_argument("--dataset_config", default=None, help="Hub dataset configuration name")
    parser.add_argument("--split", default="train", help="the split the patches come from (default: train)")
    parser.add_argument("--max_samples", type=int, default=None, help="use at most this many images of the split (stratified)")
    parser.add_argument("--per_concept", type=int, default=5, help="nearest training patches stored per concept (default: 5)")
    parser.add_argument("--thumb_size", type=int, default=32, help="side of the stored patch thumbnails in pixels (default: 32)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output_dir", help="write a copy of the model with its gallery and figures to this new folder")
    target.add_argument("--in_place", action="store_true", help="add (or replace) gallery/ and figures/ in the model folder itself")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it is a ProtoQuant model folder")
    parser.add_argument("--disable_tqdm", action="store_true", help="hide the progress bar of the pass over the data")
    args = parser.parse_args(argv)
    from .explain.model_folder import add_gallery

    extra = {"name": args.dataset_config} if args.dataset_config else {}
    try:
        folder = add_gallery(
            args.model, args.dataset, output_dir=args.output_dir, in_place=args.in_place, overwrite=args.overwrite,
            per_concept=args.per_concept, thumb_size=args.thumb_size, split=args.split, max_samples=args.max_samples,
            show_progress=not args.disable_tqdm, **extra,
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"protoquant gallery: error: {error}", file=sys.stderr)
        return 2
    print(f"Gallery and figures written to {folder}")
    return 0


PUSH_DESCRIPTION = """Publish a trained ProtoQuant model to the Hugging Face Hub in one commit: the inference bundle
(weights without training-only state, config with auto_map and the concept-explanation pipeline, remote code, image
processor, gallery, figures, summaries, a Space-ready app.py) with a model card whose numbers come from the training
summary. Log in first (`hf auth login`, or set HF_TOKEN). --dry_run OUT writes the bundle to OUT and uploads nothing."""


def push_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="protoquant push", description=PUSH_DESCRIPTION)
    parser.add_argument("--model", required=True, help="a trained ProtoQuant folder (the output of `protoquant train`)")
    parser.add_argument("--repo_id", required=True, help="the Hub repository, 'your-name/model-name'")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="a branch to push to (created if needed)")
    parser.add_argument("--license", default="apache-2.0", help="license in the model card (default: apache-2.0)")
    parser.add_argument("--include_stage1_head", action="store_true", help="keep the frozen stage-1 head (to continue stage 1)")
    parser.add_argument("--dry_run", metavar="OUT", default=None, help="write the bundle to the new folder OUT; upload nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is a bundle written before")
    args = parser.parse_args(argv)
    import tempfile

    from .hub import check_repo_and_token, export_bundle, push_bundle

    try:
        if args.dry_run is None:
            check_repo_and_token(args.repo_id)  # before the bundle is built
        with tempfile.TemporaryDirectory(prefix="protoquant-bundle-") as tmp:
            bundle = export_bundle(
                args.model, args.dry_run or Path(tmp) / "bundle", repo_id=args.repo_id, license=args.license,
                include_stage1_head=args.include_stage1_head, overwrite=args.overwrite,
            )
            files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
            if args.dry_run is not None:
                print(f"Dry run: {len(files)} files for {args.repo_id} in {bundle}, nothing uploaded:")
                print("\n".join(f"  {name}" for name in files))
                return 0
            commit = push_bundle(bundle, args.repo_id, private=args.private, revision=args.revision)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"protoquant push: error: {error}", file=sys.stderr)
        return 2
    print(f"Pushed {len(files)} files in one commit: {getattr(commit, 'commit_url', args.repo_id)}")
    return 0


EVALUATE_DESCRIPTION = """Measure a trained ProtoQuant model on a dataset with its classes: accuracy, explanation size
(concepts per class: non-zero weights, 95 % of the weight, the paper's ReLU(W) > 0.1 count; global size, sparsity,
ANZ, SimANZCC), the accuracy vs top-k-concepts-per-class curve and
grounding (max cosine of each concept to a training feature); with --stability the spatial-misalignment benchmark
(masked PGD outside the top concept's box: PAC, PRC, PLC, AC) and Gaussian-noise stability; with --purity (datasets
with part annotations, e.g. synthetic-parts) Huang et al.'s consistency and PIP-Net's part purity. Prints a table;
with --output_dir writes evaluation.json, evaluation.md and accuracy_vs_top_k.png into a new folder."""


def evaluate_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="protoquant evaluate", description=EVALUATE_DESCRIPTION)
    parser.add_argument("--model", required=True, help="a trained ProtoQuant model folder (read only)")
    parser.add_argument("--dataset", required=True, help="a bundled name, an image folder or a Hub dataset id (the model's classes)")
    parser.add_argument("--dataset_config", default=None, help="Hub dataset configuration name")
    parser.add_argument("--split", default="test", help="the split measured (default: test)")
    parser.add_argument("--max_samples", type=int, default=None, help="use at most this many images per split (stratified)")
    parser.add_argument("--output_dir", default=None, help="new folder for evaluation.json, evaluation.md and the figure")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if `protoquant evaluate` wrote it")
    parser.add_argument("--stability", action="store_true", help="run the spatial-misalignment and noise-stability benchmarks")
    parser.add_argument("--purity", action="store_true", help="run consistency and part purity (needs part annotations)")
    parser.add_argument("--no_grounding", action="store_true", help="skip the grounding pass over the training split")
    parser.add_argument("--stability_images", type=int, default=100,
                        help="images (evenly spaced over the split) for --stability / --purity (default: 100)")
    parser.add_argument("--epsilon", type=float, default=0.4, help="PGD L-inf radius in normalised pixels (default: 0.4)")
    parser.add_argument("--step_size", type=float, default=0.01, help="PGD step (default: 0.01)")
    parser.add_argument("--iterations", type=int, default=40, help="PGD iterations (default: 40)")
    parser.add_argument("--noise_std", type=float, default=0.2, help="Gaussian noise std in normalised pixels (default: 0.2)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward in the stability metrics")
    parser.add_argument("--disable_tqdm", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    from .metrics.evaluation import EvaluationSettings, evaluate_folder

    try:
        settings = EvaluationSettings(
            split=args.split, grounding=not args.no_grounding, stability=args.stability, purity=args.purity,
            stability_images=args.stability_images, epsilon=args.epsilon, step_size=args.step_size,
            iterations=args.iterations, noise_std=args.noise_std, batch_size=args.batch_size,
        )
        extra = {"name": args.dataset_config} if args.dataset_config else {}
        report = evaluate_folder(
            args.model, args.dataset, settings, output_dir=args.output_dir, overwrite=args.overwrite,
            max_samples=args.max_samples, show_progress=not args.disable_tqdm, **extra,
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"protoquant evaluate: error: {error}", file=sys.stderr)
        return 2
    rows = report.rows()
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"  {name.ljust(width)}  {value}" for name, value in rows))
    if args.output_dir:
        print(f"Wrote evaluation.json, evaluation.md and accuracy_vs_top_k.png to {args.output_dir}")
    return 0


PRUNE_DESCRIPTION = """Prune a trained ProtoQuant model into a NEW model folder (the input is never modified): keep the
top-k concepts per class (masking: the other concepts' scores are unchanged), physically remove concepts no class
uses (codebook and W shrink together; the softmax over fewer concepts changes the remaining scores slightly), and/or
prune the codebook to K concepts by usage on the training data. Every step is recorded in the model's edit log
(config.json, shown by the model card), with the accuracy before and after when --dataset is given."""

EDIT_DESCRIPTION = """Edit a trained ProtoQuant model's concept→class weights into a NEW model folder (the input is
never modified): disable a concept (for every class or one), set a class-concept weight, or rescale a concept's
weights. The backbone and the other concepts are untouched, so each affected logit changes by exactly the edited
contribution. Classes are given by label or index. Every edit is recorded in the model's edit log with --reason and,
when --dataset is given, the accuracy before and after."""


def _edit_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--model", required=True, help="a trained ProtoQuant model folder (read only)")
    parser.add_argument("--output_dir", required=True, help=f"new folder for the {what} model")
    parser.add_argument("--dataset", default=None,
                        help="measure the accuracy before and after every edit on this dataset (the model's classes)")
    parser.add_argument("--split", default="test", help="the split the accuracy is measured on (default: test)")
    parser.add_argument("--max_samples", type=int, default=None, help="use at most this many images per split (stratified)")
    parser.add_argument("--reason", default=None, help="why, recorded in the edit log and the model card")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it is a ProtoQuant model folder")
    parser.add_argument("--disable_tqdm", action="store_true", help="hide progress bars")


def _run_edits(command: str, args, edits: list[tuple[str, dict]]) -> int:
    from .model_edits import edit_folder

    try:
        result = edit_folder(
            args.model, args.output_dir, edits, dataset=args.dataset, split=args.split, max_samples=args.max_samples,
            reason=args.reason, overwrite=args.overwrite, show_progress=not args.disable_tqdm,
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"protoquant {command}: error: {error}", file=sys.stderr)
        return 2
    if result.eval_set is not None:
        print(f"accuracy on {result.eval_set}: {result.accuracy_before:.4f} before, {result.accuracy_after:.4f} after")
    for note in result.notes:
        print(note)
    print(f"Wrote the {'pruned' if command == 'prune' else 'edited'} model to {result.output_dir} "
          f"({len(result.records)} edit(s) in its edit log)")
    return 0


def prune_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="protoquant prune", description=PRUNE_DESCRIPTION)
    _edit_arguments(parser, "pruned")
    parser.add_argument("--prune_to", type=int, default=None,
                        help="first prune the codebook to this many concepts by usage on the training split (needs --dataset)")
    parser.add_argument("--prune_steps", type=int, default=4, help="rounds of usage-based pruning (usage recounted each round)")
    parser.add_argument("--top_k_per_class", type=int, default=None, help="keep the k strongest concepts per class")
    parser.add_argument("--remove_unused", action="store_true", help="remove the concepts no class uses (last)")
    args = parser.parse_args(argv)
    edits = []
    if args.prune_to is not None:
        edits.append(("prune_to", {"num_concepts": args.prune_to, "steps": args.prune_steps}))
    if args.top_k_per_class is not None:
        edits.append(("keep_top_k_per_class", {"k": args.top_k_per_class}))
    if args.remove_unused:
        edits.append(("remove_unused_concepts", {}))
    if not edits:
        parser.error("nothing to do: give --top_k_per_class, --remove_unused and/or --prune_to")
    return _run_edits("prune", args, edits)


def edit_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="protoquant edit", description=EDIT_DESCRIPTION)
    _edit_arguments(parser, "edited")
    parser.add_argument("--disable_concept", type=int, action="append", default=[], metavar="CONCEPT",
                        help="set the concept's weight to 0 (for every class, or for --for_class); repeatable")
    parser.add_argument("--for_class", default=None, metavar="CLASS",
                        help="restrict --disable_concept / --scale_weight to this class (label or index)")
    parser.add_argument("--set_weight", nargs=3, action="append", default=[], metavar=("CLASS", "CONCEPT", "VALUE"),
                        help="set W[CLASS, CONCEPT] = VALUE (>= 0); repeatable")
    parser.add_argument("--scale_weight", nargs=2, action="append", default=[], metavar=("CONCEPT", "FACTOR"),
                        help="multiply the concept's weights (every class, or --for_class) by FACTOR >= 0; repeatable")
    args = parser.parse_args(argv)
    for_class = args.for_class  # a label or an index, resolved by the model
    edits = [("disable_concept", {"concept_index": k, "class_index": for_class}) for k in args.disable_concept]
    try:
        edits += [("set_weight", {"class_index": c, "concept_index": int(k), "value": float(v)})
                  for c, k, v in args.set_weight]
        edits += [("scale_weight", {"concept_index": int(k), "factor": float(f), "class_index": for_class})
                  for k, f in args.scale_weight]
    except ValueError as error:
        parser.error(f"CONCEPT must be an integer and VALUE / FACTOR numbers ({error})")
    if not edits:
        parser.error("nothing to do: give --disable_concept, --set_weight and/or --scale_weight")
    return _run_edits("edit", args, edits)


def app_command(argv: list[str]) -> int:
    from .app import main as app_main

    return app_main(argv)


COMMANDS = {
    "train": (train, "train a ProtoQuant classifier (two stages) and save it as a Hugging Face folder"),
    "explain": (explain_command, "explain a model's decisions on images: concepts, contributions, heatmaps, patches"),
    "gallery": (gallery_command, "store each concept's nearest training patches with a model, and draw them"),
    "evaluate": (evaluate_command, "measure a model: accuracy, explanation size, grounding, stability, purity"),
    "prune": (prune_command, "prune a model into a new folder: top-k concepts per class, unused concepts, usage"),
    "edit": (edit_command, "edit a model's concept weights into a new folder (disable, set, rescale), with an edit log"),
    "push": (push_command, "publish a trained model to the Hugging Face Hub (bundle + model card, one commit)"),
    "app": (app_command, "serve a local demo app (Gradio) for a model: prediction, concepts, heatmaps, patches"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="protoquant", description="ProtoQuant interpretable image classifiers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
