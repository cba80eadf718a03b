# The two commands of the README. Each sets up what it needs first.
.PHONY: demo test

demo:
	bash scripts/setup.sh
	python3 -m protoquant_hf train --output_dir outputs/demo --overwrite

test:
	bash scripts/setup.sh --test
	python3 -m pytest -q tests
