# The two commands of the README. Each sets up what it needs first.
.PHONY: demo test docs

# The main job trains at 128 px: at the backbone's native 224 px (the CLI default) grounded fine-tuning takes longer
# than the main job's 15 minutes on 2 CPU cores (benchmarks/RESULTS.md, "The main job").
demo:
	bash scripts/setup.sh
	python3 -m protoquant_hf train --image_size 128 --output_dir outputs/demo --overwrite

test:
	bash scripts/setup.sh --test
	python3 -m pytest -q tests

# The README's figures: the main job's own output, copied to docs/ as small palette PNGs.
docs: demo
	mkdir -p docs
	python3 -c "import sys, PIL.Image; [PIL.Image.open(f'outputs/demo/figures/{name}').convert('RGB').quantize(256).save(f'docs/{name}', optimize=True) for name in sys.argv[1:]]" explanation_1_bear.png gallery_page_1.png class_bear.png overview.png
