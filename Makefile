# The two commands of the README. Each sets up what it needs first.
.PHONY: demo test docs

demo:
	bash scripts/setup.sh
	python3 -m protoquant_hf train --output_dir outputs/demo --overwrite

test:
	bash scripts/setup.sh --test
	python3 -m pytest -q tests

# The README's figures: the main job's own output, copied to docs/ as small palette PNGs.
docs: demo
	mkdir -p docs
	python3 -c "import sys, PIL.Image; [PIL.Image.open(f'outputs/demo/figures/{name}').convert('RGB').quantize(256).save(f'docs/{name}', optimize=True) for name in sys.argv[1:]]" explanation_1_bear.png gallery_page_1.png class_bear.png overview.png
