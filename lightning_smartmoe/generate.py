"""smartmoe-generate: sample text from a GPT-MoE or Llama-MoE checkpoint, whatever layout it was saved under, on one device.

    smartmoe-generate ckpt_path=outputs/.../checkpoints/last.ckpt prompt="def " max_new_tokens=200 temperature=0.8

The model config comes from the checkpoint's hyperparameters; the whole model is built in this process, every
expert in its own slot, and its tensors are read by logical expert (checkpoint.py), so checkpoints saved under
expert, tensor or pipeline parallelism load alike. Text is byte-level: the prompt is encoded as UTF-8 bytes and
the sample decoded the same way. Prints the prompt and its continuation.
"""

import dataclasses
import re
import sys
import warnings

import hydra
import torch
from omegaconf import DictConfig

from lightning_smartmoe import checkpoint
from lightning_smartmoe.config import conf_dir
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.models import MODELS
from lightning_smartmoe.models.decoder import DecoderLM


def load_model(path: str, device: torch.device) -> DecoderLM:
    """The model (GPTMoE or LlamaMoE) of checkpoint folder `path` with its trained weights, whole, in eval mode on
    `device`."""
    meta = checkpoint.read_meta(path)
    config = meta.get("hyper_parameters", {}).get("model")
    if not isinstance(config, tuple(MODELS.values())):
        raise ConfigError(f"ckpt_path={path!r} holds no model config (was it saved by MoELMModule?)")
    if getattr(config, "init_from", None) is not None:  # the trained weights are the checkpoint's
        config = dataclasses.replace(config, init_from=None)
    model = config.build()
    named = torch.nn.ModuleDict({"model": model})  # the names MoELMModule saves under
    checkpoint.validate(path, named)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, as intended
        checkpoint.load(path, named, [], meta)
    return model.to(device).eval()


@torch.no_grad()
def sample(model: DecoderLM, tokens: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
           generator: torch.Generator) -> list[int]:
    """`tokens` continued by `max_new_tokens` tokens drawn one at a time from softmax(logits / temperature) (over
    the `top_k` likeliest, if given), each conditioned on at most model.cfg.seq_len preceding tokens."""
    device = next(model.parameters()).device
    out = list(tokens)
    for _ in range(max_new_tokens):
        context = torch.tensor([out[-model.cfg.seq_len :]], dtype=torch.long, device=device)
        logits = model(context)[0][0, -1].double() / temperature
        if top_k is not None:
            logits[logits < torch.topk(logits, min(top_k, logits.numel())).values[-1]] = -torch.inf
        probs = torch.softmax(logits, dim=-1).cpu()
        out.append(int(torch.multinomial(probs, 1, generator=generator)))
    return out


def check(cfg: DictConfig) -> None:
    if not isinstance(cfg.max_new_tokens, int) or isinstance(cfg.max_new_tokens, bool) or cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens!r} must be an integer >= 1")
    if isinstance(cfg.temperature, bool) or not isinstance(cfg.temperature, int | float) or not cfg.temperature > 0:
        raise ConfigError(f"temperature={cfg.temperature!r} must be a number > 0")
    if cfg.top_k is not None and (isinstance(cfg.top_k, bool) or not isinstance(cfg.top_k, int) or cfg.top_k < 1):
        raise ConfigError(f"top_k={cfg.top_k!r} must be an integer >= 1 or null")
    if cfg.accelerator not in ("cpu", "cuda") or (cfg.accelerator == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"accelerator={cfg.accelerator!r} cannot run here; allowed: cpu" + (", cuda" if torch.cuda.is_available() else ""))


def run(cfg: DictConfig) -> None:
    try:
        check(cfg)
        model = load_model(str(cfg.ckpt_path), torch.device(cfg.accelerator))
        prompt = list(str(cfg.prompt).encode("utf-8"))
        if model.cfg.vocab_size < 256:
            raise ConfigError(f"the model's vocabulary ({model.cfg.vocab_size} tokens) is not byte-level; text prompts need 256")
        if not prompt:
            prompt = [ord("\n")]
    except ConfigError as err:
        print(f"smartmoe-generate: error: {err}", file=sys.stderr)
        sys.exit(2)
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens = sample(model, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator)
    print(bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace"))


def quote_values(args: list[str], keys: tuple[str, ...]) -> list[str]:
    """Each `KEY=TEXT` of `keys` as one Hydra-quoted string, so that TEXT is kept exactly (Hydra strips unquoted
    values and refuses some characters in them, such as the `=` of `epoch=0-step=4.ckpt`)."""
    def quoted(arg: str) -> str:
        key, text = arg.split("=", 1)
        if text[:1] in ("'", '"') and text[-1:] == text[:1] and len(text) > 1:
            return arg
        body = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", text)  # Hydra unescapes backslashes only before quotes
        body = re.sub(r"(\\+)$", lambda m: m[1] * 2, body)
        return f"{key}='{body}'"
    return [quoted(a) if a.split("=", 1)[0] in keys and "=" in a else a for a in args]


def main() -> None:
    sys.argv[1:] = quote_values(sys.argv[1:], ("prompt", "ckpt_path"))
    hydra.main(config_path=str(conf_dir()), config_name="generate", version_base="1.3")(run)()


if __name__ == "__main__":
    main()
