# numgan: two commands on a fresh machine (Python 3.11+):
#   make figures   set up .venv and reproduce every figure at the default (smoke, CPU) scale
#   make test      set up .venv and run the unit tests and every notebook at smoke scale (what CI runs)
# Full scale (the paper's settings, GPU):  make figures SCALE=full DEVICE=cuda [FIGURES="5 11"]

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
SCALE   ?= smoke
DEVICE  ?= auto
FIGURES ?= all
# one OpenMP thread: the smoke runs and the MoG networks are far too small to gain from more, and on a
# busy 2-core machine two threads per process made steps up to 40x slower (spin-waiting), measured here
export OMP_NUM_THREADS ?= 1
# real images for the smoke runs and data tests when the offline copies sit beside the checkout
SHARED  ?= $(abspath ../shared/data)
TESTDATA := $(CURDIR)/.cache/shared-data

.PHONY: figures test install clean-notebooks

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,notebooks]"
	touch $@

install: $(VENV)/.installed

figures: $(VENV)/.installed
	$(VENV)/bin/numgan-figures --figures $(FIGURES) --scale $(SCALE) --device $(DEVICE)

$(TESTDATA):
	@if [ -d "$(SHARED)/cifar10" ]; then mkdir -p $(TESTDATA)/celeba && \
	  ln -sfn "$(SHARED)/cifar10" $(TESTDATA)/cifar10 && \
	  ln -sfn "$(SHARED)/celeba/celeba-align-5k-halfres.zip" $(TESTDATA)/celeba/img_align_celeba.zip; \
	else mkdir -p $(TESTDATA); echo "no $(SHARED): smoke runs use synthetic images"; fi

test: $(VENV)/.installed $(TESTDATA)
	NUMGAN_DATA=$(TESTDATA) MPLBACKEND=Agg $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env \
	  --nbval-cell-timeout=900 -p no:cacheprovider -q

clean-notebooks: $(VENV)/.installed
	$(PY) scripts/clean_notebooks.py notebooks/*.ipynb
