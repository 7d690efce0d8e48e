"""Chat-model targets: the vLLM backend against a stub engine (vLLM cannot run here), the HF backend's batching."""

from __future__ import annotations

import gc
import sys
import weakref
from types import ModuleType, SimpleNamespace

import pytest
from PIL import Image

from eval.config import ConfigError, DefenceConfig, EvalConfig, TargetConfig
from eval.targets import ChatRequest, HFChatModel, load_target
from moderator.images import DEFAULT_MIN_PIXELS

NO_DEFENCE = [DefenceConfig(kind="none")]


class StubEngine:
    """Stands in for ``vllm.LLM``: records its arguments and calls; like one GPU, it holds one model at a time."""

    alive: weakref.WeakSet = weakref.WeakSet()  # weak: the test checks that nothing else holds an engine
    events: list[tuple] = []

    def __init__(self, **kwargs):
        if any(not engine.shut_down for engine in StubEngine.alive):
            raise RuntimeError("CUDA out of memory: the previous engine still holds the GPU")
        self.kwargs = kwargs
        self.shut_down = False
        self.generate_calls: list[list[dict]] = []
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))
        StubEngine.alive.add(self)
        StubEngine.events.append(("engine", kwargs["model"]))

    def _shutdown(self):
        self.shut_down = True
        StubEngine.events.append(("shutdown", self.kwargs["model"]))

    def generate(self, prompts, params, use_tqdm=True):
        self.generate_calls.append(list(prompts))
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f" reply {i} ")]) for i in range(len(prompts))]


@pytest.fixture
def stub_vllm(monkeypatch):
    """A ``vllm`` package in sys.modules with the three entry points the backend uses."""
    StubEngine.alive, StubEngine.events = weakref.WeakSet(), []
    vllm = ModuleType("vllm")
    vllm.LLM = StubEngine
    vllm.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
    distributed = ModuleType("vllm.distributed")
    parallel_state = ModuleType("vllm.distributed.parallel_state")
    parallel_state.destroy_model_parallel = lambda: StubEngine.events.append(("destroy_model_parallel",))
    parallel_state.destroy_distributed_environment = lambda: StubEngine.events.append(("destroy_distributed",))
    vllm.distributed, distributed.parallel_state = distributed, parallel_state
    for name, module in (
        ("vllm", vllm),
        ("vllm.distributed", distributed),
        ("vllm.distributed.parallel_state", parallel_state),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    return StubEngine


def _requests(n: int) -> list[ChatRequest]:
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    return [
        ChatRequest(
            dialogue=({"role": "user", "content": f"question {i}"},),
            system="Be careful." if i % 2 else None,
            image=image if i % 3 else None,
        )
        for i in range(n)
    ]


def _vllm_target(model_dir, **fields) -> TargetConfig:
    config = EvalConfig(
        safemt_dir="unused",
        targets=[TargetConfig(model=str(model_dir), backend="vllm", **fields)],
        defences=NO_DEFENCE,
    )
    return config.targets[0]


def test_vllm_gets_its_engine_settings_from_the_config_and_the_whole_workload_in_one_call(stub_vllm, tiny_model_dir):
    config = _vllm_target(
        tiny_model_dir,
        max_model_len=8192,
        tensor_parallel_size=2,
        gpu_memory_utilization=0.75,
        limit_mm_per_prompt={"image": 2},
        max_pixels=6272,
    )
    target = load_target(config)
    (engine,) = list(stub_vllm.alive)
    assert engine.kwargs == {
        "model": str(tiny_model_dir),
        "dtype": "bfloat16",
        "trust_remote_code": False,
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.75,
        "seed": 0,
        "max_model_len": 8192,
        "limit_mm_per_prompt": {"image": 2},
        "mm_processor_kwargs": {"min_pixels": DEFAULT_MIN_PIXELS, "max_pixels": 6272},
    }
    assert target.batches_internally

    requests = _requests(37)
    replies = target.generate(requests, max_new_tokens=5)
    assert replies == [f"reply {i}" for i in range(37)]
    (prompts,) = engine.generate_calls  # one engine call for the whole workload, not batch_size at a time
    assert len(prompts) == 37
    for request, prompt in zip(requests, prompts, strict=True):
        assert ("multi_modal_data" in prompt) == (request.image is not None)
        assert prompt["prompt"].count("<|image_pad|>") == (request.image is not None)
        assert prompt["prompt"].endswith("<|im_start|>assistant\n")


def test_vllm_engine_is_shut_down_and_freed_before_the_next_target_loads(stub_vllm, tiny_model_dir):
    first = load_target(_vllm_target(tiny_model_dir))
    first.generate(_requests(3), max_new_tokens=2)
    engine = weakref.ref(first.llm)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_target(_vllm_target(tiny_model_dir))  # what happened before: the first engine kept the GPU

    first.close()
    gc.collect()
    assert engine() is None  # no reference to the engine is left anywhere
    assert stub_vllm.events[-3:] == [
        ("shutdown", str(tiny_model_dir)),
        ("destroy_model_parallel",),
        ("destroy_distributed",),
    ]
    first.close()  # idempotent: the eval loop may close a target twice
    with pytest.raises(RuntimeError, match="closed"):
        first.generate(_requests(1), max_new_tokens=2)

    with load_target(_vllm_target(tiny_model_dir)) as second:  # fits now; freed on leaving the block
        assert second.generate(_requests(2), max_new_tokens=2) == ["reply 0", "reply 1"]
    assert second.llm is None and stub_vllm.events[-3][0] == "shutdown"


def test_vllm_engine_settings_are_refused_on_the_hf_backend_and_checked():
    for key, value in (("tensor_parallel_size", 2), ("max_model_len", 4096), ("gpu_memory_utilization", 0.5)):
        with pytest.raises(ConfigError, match=f"targets.0.{key}: is a vLLM engine setting"):
            EvalConfig(
                safemt_dir="s", targets=[TargetConfig(model="m", **{key: value})], defences=NO_DEFENCE
            ).validate()
    with pytest.raises(ConfigError, match="targets.0.gpu_memory_utilization: must be in"):
        EvalConfig(
            safemt_dir="s",
            targets=[TargetConfig(model="m", backend="vllm", gpu_memory_utilization=1.5)],
            defences=NO_DEFENCE,
        ).validate()
    with pytest.raises(ConfigError, match="targets.0.min_pixels: 9000 exceeds max_pixels 3136"):
        EvalConfig(
            safemt_dir="s", targets=[TargetConfig(model="m", min_pixels=9000, max_pixels=3136)], defences=NO_DEFENCE
        ).validate()


def test_hf_target_batches_any_workload_by_its_batch_size(tiny_model_dir):
    config = EvalConfig(
        safemt_dir="s",
        targets=[TargetConfig(model=str(tiny_model_dir))],
        defences=NO_DEFENCE,
        batch_size=2,
    ).validate()
    with load_target(config.targets[0]) as target:
        assert isinstance(target, HFChatModel) and target.batch_size == 2 and not target.batches_internally
        calls = []
        generate = target.model.generate
        target.model.generate = lambda **kwargs: calls.append(kwargs["input_ids"].shape[0]) or generate(**kwargs)
        replies = target.generate(_requests(5), max_new_tokens=2)
        assert len(replies) == 5 and calls == [2, 2, 1]
    assert target.model is None  # closed on leaving the block
