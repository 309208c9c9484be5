"""Routing an adapter's modules to the components of a pipeline runtime.

A runtime injected into several models (``lorahot.inject({"unet": ..., "text_encoder": ...})``)
names its layers ``<component>.<module path>``. A file names its components with prefixes:
diffusers ``unet.``/``transformer.``/``text_encoder.``/``text_encoder_2.``, kohya
``lora_unet_``/``lora_te_``/``lora_te1_``/``lora_te2_``, BFL/ComfyUI ``diffusion_model.``, the original
LTX-2 checkpoint's ``text_embedding_projection.`` (an LTX-2 pipeline's ``connectors``), Anima's
``llm_adapter.`` (an Anima pipeline's ``text_conditioner``, stripped: its paths follow). ComfyUI
names a text encoder by what it is (``text_encoders.clip_l.transformer.``, ``clip_g``, ``t5xxl``,
``llama``, ``qwen25_7b``, ...): its modules go to the component of that architecture, told by the
modules it has (a CLIP's ``position_embedding``/``fc1``, a T5's ``SelfAttention``, a decoder LM's
``embed_tokens``/``gate_proj``), SD3's place deciding between several, refused where none or
several fit; a CLIP name (``clip_l``, ``clip_g``, ``clip_h``) only to a CLIP that ComfyUI's model
holds under that name, as ComfyUI maps it nowhere else (:func:`_clip_names`). A CLIP's modules
in kohya's ``lora_te_``/``lora_te1_`` or diffusers' ``text_encoder.`` naming whose prefix names a
component that is no CLIP (a HunyuanVideo pipeline's Llama) go to the lone CLIP where ComfyUI maps
them onto it (HunyuanVideo's CLIP-L ``text_encoder_2``), and are refused otherwise.
sd-scripts names the T5 ``lora_te3_`` in its Flux.1 files too,
whose pipeline holds the T5 as ``text_encoder_2``: T5 modules (:data:`T5_PREFIXES`) go to
``text_encoder_2`` on a runtime without a ``text_encoder_3`` whose ``text_encoder_2`` has their
modules (diffusers' Flux loader drops them).
Each module goes to the component its prefix names: first a component of the runtime itself,
by its name and a dot (a ``controlnet`` component takes ``controlnet.`` modules, whatever it is
called), then :data:`ROUTES`, where every diffusers pipeline component's name is one (``vae.``
modules go to a ``vae`` or are refused naming it, never to the denoiser); it is then resolved
against that component's layers only, exactly as on a single model (:mod:`lorahot.resolve.keys`),
so two components with the same module paths (two CLIP encoders) never compete for a key.
Prefixes end with their naming's separator: ``text_encoder.`` never takes ``text_encoder_2.``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence

from lorahot.adapter import Adapter, LoraModule, WeightModule
from lorahot.errors import AdapterMismatchError, format_problems, lines, message, shown
from lorahot.formats import FORMATS
from lorahot.resolve.keys import COMPONENT_NAMES, COMPONENT_PREFIXES, ROOT_PREFIXES, file_naming, resolve_all

__all__ = ["ROUTES", "DENOISER", "T5_PREFIXES", "COMFYUI_ENCODER", "route", "resolve_components", "non_denoisers"]

#: The denoiser a prefix without a fixed component (``lora_unet_`` is Flux's transformer too)
#: or a key without any prefix goes to: the first of these the runtime has.
DENOISER = ("unet", "transformer")

#: File prefix -> component (``None``: the denoiser), longest prefixes first. Every pipeline
#: component's name (:data:`~lorahot.resolve.keys.COMPONENT_NAMES`: ``vae.``, ``image_encoder.``)
#: names that component: without it its modules are refused (skipped with ``strict=False``), never
#: sent to the denoiser, where the rest of a key could match a layer.
ROUTES: tuple[tuple[str, str | None], ...] = tuple(
    sorted(
        {
            **{name + ".": name for name in sorted(COMPONENT_NAMES)},
            "unet.": "unet",
            "transformer.": "transformer",
            "text_encoder.": "text_encoder",
            "text_encoder_2.": "text_encoder_2",
            "text_encoder_3.": "text_encoder_3",
            "controlnet.": "controlnet",  # diffusers' other component prefixes: never the denoiser's
            "prior.": "prior",
            "lora_unet_": None,
            "lycoris_": None,
            "oft_unet_": None,  # sd-scripts' OFT network
            "lora_transformer_": "transformer",
            "lora_te_": "text_encoder",
            "lora_te1_": "text_encoder",
            "lora_te2_": "text_encoder_2",
            "lora_te3_": "text_encoder_3",
            "lora_prior_unet_": "prior",  # sd-scripts' Stable Cascade Stage C and its CLIP text encoder
            "lora_prior_te_": "text_encoder",
            "transformer_1.": "transformer",  # ai-toolkit's Wan 2.2 files of both transformers
            "transformer_2.": "transformer_2",
            "diffusion_model.": None,
            "model.diffusion_model.": None,
            "base_model.model.": None,
            # PixArt's old PEFT reference script: the denoiser (a PixArt pipeline's transformer), as ComfyUI maps it
            "unet.base_model.model.": None,
            **COMPONENT_PREFIXES,  # LTX-2's text_embedding_projection.: connectors; Anima's llm_adapter.
        }.items(),
        key=lambda kv: len(kv[0]),
        reverse=True,
    )
)


#: Prefixes of T5 text-encoder modules: sd-scripts' (its SD3 and Flux.1 files) and ComfyUI's.
#: They name ``text_encoder_3``, SD3's T5; a Flux.1 pipeline's T5 is its ``text_encoder_2``.
T5_PREFIXES = ("lora_te3_", "text_encoders.t5xxl.transformer.")
#: Prefixes that name one component whatever ``denoiser=`` says.
_NAMED_COMPONENT = ("transformer_1.",)

#: A ComfyUI text-encoder module key: ``text_encoders.<encoder>.transformer.<the encoder's own
#: names>``; the encoder is named by what it is (``clip_l``, ``t5xxl``, ``llama``, ``qwen25_7b``),
#: not by where a pipeline holds it, so it goes to the component of that architecture
#: (:func:`_comfyui_targets`).
COMFYUI_ENCODER = re.compile(r"text_encoders\.(?P<encoder>[a-z0-9_]+)\.transformer\.")
#: ComfyUI's encoder names -> the architecture (first match): CLIPs, the T5 family, decoder LMs
_ENCODER_FAMILIES = (
    (r"^clip_", "CLIP"),
    (r"^(?:pile_)?(?:u|m|by)?t5", "T5"),
    (r"^(?:llama|llava|qwen|gemma|mistral|ministral|phi|olmo|glm)", "decoder language model"),
)
#: architecture -> a module path (relative to the component) only a model of it has
_FINGERPRINTS = {
    "CLIP": r"(?:^|\.)(?:embeddings\.position_embedding|mlp\.fc[12]|self_attn\.out_proj)$",
    "T5": r"(?:^|\.)(?:SelfAttention|EncDecAttention|DenseReluDense)(?:\.\w+)?$",
    "decoder language model": r"(?:^|\.)(?:embed_tokens|mlp\.(?:gate|up|down)_proj|self_attn\.o_proj)$",
}
#: where SD3 holds each encoder: the choice where several components have its architecture
#: (SDXL's and SD3's two CLIPs)
_SD3_PLACE = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
#: ComfyUI's CLIP names: a model holds each as one CLIP of its own (SD1.x its ``clip_l``, SD2.x
#: its ``clip_h``, the SDXL refiner and Stable Cascade their ``clip_g``, SDXL and SD3 ``clip_l``
#: and ``clip_g``) and ignores the modules of the others (:func:`_clip_names`)
_CLIP_NAMES = ("clip_l", "clip_g", "clip_h")
#: a lone CLIP's depth (encoder layers) -> the ComfyUI name of the model that holds it so: OpenCLIP
#: ViT-bigG (32 layers: SDXL's refiner, Stable Cascade) and ViT-H (24, diffusers' SD2.x keeps 23);
#: any other depth is a CLIP-L (12 layers: SD1.x, Flux.1, HunyuanVideo)
_LONE_CLIP_DEPTHS = {32: "clip_g", 24: "clip_h", 23: "clip_h"}
#: where ComfyUI holds each of :data:`_CLIP_NAMES` (for refusals)
_CLIP_PLACES = {
    "clip_l": "the first of two CLIPs (text_encoder: SDXL's, SD3's) or a lone CLIP neither 32 nor 23/24 layers deep",
    "clip_g": "the second of two CLIPs (text_encoder_2: SDXL's, SD3's) or a lone CLIP 32 layers deep (the SDXL "
    "refiner's)",
    "clip_h": "a lone CLIP 23 or 24 layers deep (SD2.x's OpenCLIP-H)",
}
#: a module key (after its component prefix) in a CLIP text encoder's own names, kohya's or dotted
_CLIP_MODULE = re.compile(r"text_model[._]")
#: a CLIP encoder layer's index in a module path (transformers 5 has no ``text_model.`` level)
_CLIP_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")
#: Where T5 modules go on a runtime without ``text_encoder_3``, if it holds their modules.
_T5_ELSEWHERE = "text_encoder_2"
#: The prefixes of a pipeline's first CLIP: kohya's ``lora_te_``/``lora_te1_`` and diffusers'
#: ``text_encoder.``, each -> the ComfyUI names of a CLIP that ComfyUI maps them onto (its
#: ``model_lora_keys_clip``: ``clip_l`` or ``clip_h``). ComfyUI maps ``lora_te_`` and
#: ``text_encoder.`` onto a lone ``clip_g`` too, the SDXL refiner's, which is a second CLIP
#: (diffusers' ``text_encoder_2``, where diffusers' loader fails on them): lorahot never takes it for
#: a first one (:func:`_no_first_message`)
_FIRST_CLIP = {
    "lora_te_": ("clip_l", "clip_h"),
    "lora_te1_": ("clip_l", "clip_h"),
    "text_encoder.": ("clip_l", "clip_h"),
}
#: kohya's prefix of a pipeline's second CLIP (SDXL's and SD3's CLIP-G), and the component it names
_SECOND_CLIP = "lora_te2_"
_TE2 = "text_encoder_2"


#: the pipeline components the routing sends no denoiser module to (each has its own prefix in
#: :data:`ROUTES`), and what each is
_ROLES = {
    **dict.fromkeys(("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"), "a text encoder"),
    "image_encoder": "an image encoder",
    **dict.fromkeys(("vae", "audio_vae", "movq"), "a VAE"),
    "vocoder": "a vocoder",
    "safety_checker": "a safety checker",
    "connectors": "LTX-2's text connectors",
    "text_conditioner": "Anima's text conditioner",
}
#: what a component of each text-encoder architecture (:data:`_FINGERPRINTS`) is
_ARCHITECTURE_ROLES = {
    "CLIP": "a CLIP encoder",
    "T5": "a T5 text encoder",
    "decoder language model": "a language model (a text encoder)",
}
#: a module path (relative to the component) only an autoencoder has: its encoder's or decoder's
#: first conv (a UNet's conv_in is at its root)
_VAE_FINGERPRINT = re.compile(r"^(?:encoder|decoder)\.conv_in$")


def non_denoisers(components: Sequence[str], paths: Sequence[str]) -> dict[str, str]:
    """The components that are no denoiser, each with what it is, for ``denoiser=``'s check.

    A component is one by what the routing knows of it: its name is one :data:`ROUTES` gives
    a text encoder, a VAE or another non-denoiser role (``text_encoder_2``, ``vae``,
    ``image_encoder``), or its modules have a text encoder's architecture (a CLIP's, a T5's, a
    decoder language model's, as ComfyUI's encoder names are routed) or an autoencoder's. The
    :data:`DENOISER` components and ``transformer_2`` (Wan 2.2's low-noise transformer) are
    denoisers whatever their modules.

    Args:
        components: the runtime's component names.
        paths: the models' module paths, ``<component>.<path>``.
    """
    out = {}
    for component in components:
        if component in (*DENOISER, "transformer_2"):
            continue
        role = _ROLES.get(component)
        if role is None:
            archs = _architectures(component, list(paths))
            role = next((r for arch, r in _ARCHITECTURE_ROLES.items() if arch in archs), None)
        head = component + "."
        if role is None and any(p.startswith(head) and _VAE_FINGERPRINT.match(p[len(head) :]) for p in paths):
            role = "a VAE"
        if role is not None:
            out[component] = role
    return out


def route(key: str, components: tuple[str, ...], denoiser: str | None = None) -> tuple[str | None, str]:
    """``(component, prefix)`` for a module key: the component is None when the runtime lacks
    the one the prefix names (``prefix`` says which; ``""`` for a key without a prefix).

    A key that starts with one of ``components`` and a dot goes to that component (the longest
    such name), unless a longer prefix of :data:`ROUTES` starts it: a module for a component the
    runtime holds never lands in another one whose module paths it shares (a ControlNet's down
    blocks are the UNet's). ``denoiser`` (one of ``components``; the caller checks it) takes
    every module that would go to a :data:`DENOISER` (``unet.``, ``transformer.``,
    ``diffusion_model.``, ``lora_unet_``, no prefix): a Wan 2.2 pipeline's ``transformer_2``
    takes its low-noise file, in the naming of the one transformer the file was trained for."""
    prefix, target = next(((p, c) for p, c in ROUTES if key.startswith(p)), ("", None))
    if prefix in _NAMED_COMPONENT:
        return (target if target in components else None), prefix
    own = max((c for c in components if key.startswith(c + ".")), key=len, default=None)
    if own is not None and len(own) + 1 >= len(prefix):
        target, prefix = own, own + "."
    if denoiser is not None and (target is None or target in DENOISER):
        return denoiser, prefix
    if target is None:
        target = next((c for c in DENOISER if c in components), DENOISER[0] + "/" + DENOISER[1])
    return (target if target in components else None), prefix


Module = LoraModule | WeightModule

#: Component prefixes some naming strips itself when matching keys (:mod:`lorahot.resolve.keys`).
_NAMED = frozenset(p for f in FORMATS for p in f.prefixes)


def resolve_components(
    adapter: Adapter,
    names: list[str],
    components: tuple[str, ...],
    skipped: list[str] | None = None,
    others: Sequence[str] = (),
    heads: Mapping[str, int] | None = None,
    denoiser: str | None = None,
    weightless: Sequence[str] = (),
    unwrapped: Sequence[tuple[str, str]] = (),
    levels: Collection[str] | None = None,
) -> tuple[dict[str, LoraModule], dict[str, WeightModule]]:
    """:func:`lorahot.resolve.keys.resolve_all` over the layers ``<component>.<path>``.

    Args:
        names: the injected layers' names, each ``<component>.<module path>``.
        components: the runtime's component names.
        skipped: if given (``strict=False``), modules routed to a component the runtime does
            not have, and those matching no layer of their component, are listed here.
        others: the other module paths of the models, ``<component>.<path>`` (see
            :func:`~lorahot.resolve.keys.resolve_all`).
        heads: the attention head sizes of the models' modules, by ``<component>.<path>``.
        denoiser: the component that takes the modules a :data:`DENOISER` would (see
            :func:`route`), one of ``components``; None: the runtime's own.
        weightless: the models' normalization layers without a weight, ``<component>.<path>``
            (see :func:`~lorahot.resolve.keys.resolve_all`).
        unwrapped: the models' modules read without a call, ``(<component>.<path>, why)`` (see
            :func:`~lorahot.resolve.keys.resolve_all`).
        levels: the models' wrapper levels, ``<component>.<path>`` (see
            :func:`~lorahot.resolve.keys.resolve_all`); None: every level of those names.

    Raises:
        AdapterMismatchError: modules for a component the runtime lacks (naming the prefix,
            the component and the fix), a CLIP's modules routed to a component that is no CLIP
            (a Llama), or what ``resolve_all`` raises, per component.
    """
    groups: dict[str, list[tuple[str, Module]]] = {c: [] for c in components}
    missing: dict[str, list[str]] = {}
    entries: list[tuple[str, Module]] = [*adapter.modules.items(), *adapter.weights.items()]
    t5 = _t5_elsewhere([k for k, _ in entries], components, [*names, *others])
    encoders = _comfyui_targets([k for k, _ in entries], components, [*names, *others])
    archs = {c: _architectures(c, [*names, *others]) for c in components}
    not_clip: dict[tuple[str, str], list[str]] = {}  # (component, prefix) -> CLIP modules it is no CLIP for
    first_clip = _first_clip_of_te2(components, archs, [*names, *others])
    not_second: list[str] = []  # lora_te2_ modules whose text_encoder_2 is no second CLIP
    # a runtime whose only CLIP is a second one (the SDXL refiner's): the first CLIP's modules go nowhere
    second_only = "text_encoder" not in components and not first_clip and "CLIP" in archs.get(_TE2, ())
    no_first: list[str] = []  # modules of the first CLIP (lora_te_, lora_te1_, text_encoder.) on such a runtime
    for key, module in entries:
        encoder = COMFYUI_ENCODER.match(key)
        if encoder is not None:
            component, prefix = encoders[encoder["encoder"]][0], encoder.group(0)
        else:
            component, prefix = route(key, components, denoiser)
        if component is None and prefix == T5_PREFIXES[0] and t5:
            component = _T5_ELSEWHERE
        if prefix in _FIRST_CLIP and component is not None and _CLIP_MODULE.match(key[len(prefix) :]):
            component = _first_clip_target(prefix, component, archs, [*names, *others])
        if (
            component is not None
            and prefix
            and _CLIP_MODULE.match(key[len(prefix) :])
            and archs[component]
            and "CLIP" not in archs[component]
        ):
            # a CLIP's modules (``text_model.encoder.layers.0...``) on a Llama: its ``layers.0...``,
            # the CLIP's levels dropped as wrappers, would take them
            if skipped is not None:
                skipped.extend(module.source_keys or (key,))
            else:
                not_clip.setdefault((component, prefix), []).append(key)
            continue
        if prefix == _SECOND_CLIP and component is not None and first_clip:
            # kohya's second CLIP (SDXL's, SD3's CLIP-G) on a CLIP that is a model's first or only
            # one (HunyuanVideo's CLIP-L): the same module names, another encoder
            if skipped is not None:
                skipped.extend(module.source_keys or (key,))
            else:
                not_second.append(key)
            continue
        if component is None and second_only and prefix in _FIRST_CLIP:
            # never onto the second CLIP, whose layers have the same names (ComfyUI's refiner mapping)
            if skipped is not None:
                skipped.extend(module.source_keys or (key,))
            else:
                no_first.append(key)
            continue
        if component is not None:
            if encoder is not None or (prefix == component + "." and prefix not in _NAMED) or prefix in ROOT_PREFIXES:
                key = key[len(prefix) :]  # a prefix no naming strips: the component's paths follow
            groups[component].append((key, module))
        elif skipped is not None:
            skipped.extend(module.source_keys or (key,))
        else:
            missing.setdefault(prefix, []).append(key)
    if missing:
        raise AdapterMismatchError(_missing_message(adapter.source, missing, components, encoders))
    if not_clip:
        raise AdapterMismatchError(_not_clip_message(adapter.source, not_clip, archs))
    if not_second:
        raise AdapterMismatchError(_not_second_message(adapter.source, not_second, components, archs, first_clip))
    if no_first:
        raise AdapterMismatchError(_no_first_message(adapter.source, no_first, components, archs))
    return _resolve_each(adapter, groups, names, skipped, others, heads or {}, weightless, unwrapped, levels)


def _first_clip_target(prefix: str, component: str, archs: Mapping[str, set[str]], paths: Sequence[str]) -> str:
    """The component for a CLIP module (``text_model...``) that ``prefix``, one of :data:`_FIRST_CLIP`,
    sends to ``component``: that one unless it is recognized as no CLIP (a HunyuanVideo pipeline's
    Llama ``text_encoder``), and then the runtime's lone CLIP where ComfyUI maps ``prefix`` onto it
    (HunyuanVideo's CLIP-L ``text_encoder_2``, its ``clip_l``; diffusers' HunyuanVideo loader loads
    no text encoder); ``component`` still where there is none (refused as no CLIP)."""
    if not archs[component] or "CLIP" in archs[component]:
        return component
    clips = [c for c, found in archs.items() if "CLIP" in found]
    if len(clips) != 1:
        return component
    held = _clip_names(clips, paths).get(clips[0])
    return clips[0] if held in _FIRST_CLIP[prefix] else component


def _not_clip_message(source: str, not_clip: dict[tuple[str, str], list[str]], archs: Mapping[str, set[str]]) -> str:
    """Why the CLIP modules ``not_clip`` (by the component and prefix that route them) are
    refused: each component they go to is no CLIP (``archs``: each component's architectures)."""
    clips = [c for c, found in archs.items() if "CLIP" in found]
    rows = [
        f"{len(keys)} module(s) with prefix {shown(prefix, 200)} (e.g. {keys[0]}) are a CLIP text encoder's "
        f"(text_model...), and go by their prefix to {component}, which is "
        f"{' and '.join(_ARCHITECTURE_ROLES[a] for a in sorted(archs[component]))}, no CLIP"
        for (component, prefix), keys in not_clip.items()
    ]
    where = f"this runtime's CLIP is {', '.join(clips)}" if clips else "this runtime has no CLIP"
    return lines(
        format_problems(f"{source}: CLIP modules routed to a component that is no CLIP:", rows),
        f"Their names would land on that encoder's layers of the same names; {where}. Rename their prefix "
        "to the CLIP's component (key_map=), or load with strict=False to skip those modules.",
    )


def _first_clip_of_te2(components: tuple[str, ...], archs: Mapping[str, set[str]], paths: Sequence[str]) -> str:
    """ComfyUI's name of this runtime's ``text_encoder_2`` where it is a CLIP other than a second
    one (``clip_l``: HunyuanVideo's lone CLIP-L beside its Llama; ``clip_h``), which kohya's
    :data:`_SECOND_CLIP` never names; empty where it is a second CLIP (SDXL's and SD3's CLIP-G,
    the SDXL refiner's lone OpenCLIP-G), no CLIP, of no known architecture, or absent."""
    if _TE2 not in components or "CLIP" not in archs[_TE2]:
        return ""
    name = _clip_names([c for c in components if "CLIP" in archs[c]], paths).get(_TE2)
    return "" if name == "clip_g" else name or "a CLIP"


def _encoders(components: tuple[str, ...], archs: Mapping[str, set[str]], held: str) -> str:
    """This runtime's text encoders (and other components of a known role), each with what it is,
    ``text_encoder_2`` with the name ComfyUI gives it (``held``)."""
    return "; ".join(
        f"{c}, {' and '.join(_ARCHITECTURE_ROLES[a] for a in sorted(archs[c])) or _ROLES.get(c, 'of unknown kind')}"
        + (f" (ComfyUI's {held})" if c == _TE2 else "")
        for c in components
        if c in _ROLES or archs[c]
    )


def _some(keys: list[str]) -> str:
    """The first three of ``keys``, shown, and ``...`` where there are more."""
    return ", ".join(shown(k, 200) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")


def _not_second_message(
    source: str, keys: list[str], components: tuple[str, ...], archs: Mapping[str, set[str]], held: str
) -> str:
    """Why the ``lora_te2_`` modules ``keys`` are refused: this runtime's ``text_encoder_2`` is a
    CLIP that ComfyUI calls ``held`` (no second CLIP, which kohya's ``lora_te2_`` names)."""
    return (
        f"{source}: {len(keys)} module(s) with prefix {_SECOND_CLIP} ({_some(keys)}) are kohya's second CLIP text "
        "encoder's (CLIP-G, OpenCLIP ViT-bigG: SDXL's and SD3's text_encoder_2), and this runtime has no second CLIP: "
        f"its text encoders are {_encoders(components, archs, held)}. They would land on the layers of the same names "
        "of another encoder (ComfyUI maps lora_te2_ only onto the clip_g beside a clip_l). Load the file on a runtime "
        "over the pipeline it was trained for (SDXL: lorahot.inject({..., 'text_encoder': pipe.text_encoder, "
        "'text_encoder_2': pipe.text_encoder_2}, ...)), rename the prefix with key_map= if these modules really are "
        "this encoder's, or load with strict=False to skip them."
    )


def _no_first_message(source: str, keys: list[str], components: tuple[str, ...], archs: Mapping[str, set[str]]) -> str:
    """Why the modules ``keys`` of a pipeline's first CLIP (kohya's ``lora_te_``/``lora_te1_``,
    diffusers' ``text_encoder.``) are refused on a runtime whose only CLIP is a second one
    (``text_encoder_2``: the SDXL refiner's OpenCLIP ViT-bigG): the references part ways there."""
    prefixes = ", ".join(dict.fromkeys(p for k in keys for p in _FIRST_CLIP if k.startswith(p)))
    return (
        f"{source}: {len(keys)} module(s) with prefix {prefixes} ({_some(keys)}) are a pipeline's first CLIP text "
        "encoder's (SDXL's CLIP-L, text_encoder), and this runtime has no first CLIP: its text encoders are "
        f"{_encoders(components, archs, 'clip_g')}, the second CLIP alone, as in an SDXL refiner pipeline. There "
        "diffusers' SDXL loader fails on these keys (the pipeline's text_encoder is None), and ComfyUI maps lora_te_ "
        "and text_encoder. onto that second CLIP (its clip_g; lora_te1_ nowhere), the first encoder's weights on "
        "another encoder's layers of the same names; lorahot does neither. Load with strict=False to skip them (the "
        "refiner's own lora_te2_ and unet modules load), load the file on the pipeline it was trained for (SDXL "
        "base: lorahot.inject({..., 'text_encoder': pipe.text_encoder, 'text_encoder_2': pipe.text_encoder_2}, "
        "...)), or, if they really are this encoder's, rename their prefix to lora_te2_ (key_map=)."
    )


def _resolve_each(
    adapter: Adapter,
    groups: dict[str, list[tuple[str, Module]]],
    names: list[str],
    skipped: list[str] | None,
    others: Sequence[str],
    heads: Mapping[str, int],
    weightless: Sequence[str],
    unwrapped: Sequence[tuple[str, str]] = (),
    levels: Collection[str] | None = None,
) -> tuple[dict[str, LoraModule], dict[str, WeightModule]]:
    """:func:`~lorahot.resolve.keys.resolve_all` of each component's ``groups`` (its modules, by
    their keys within it) over its own layers, the results named ``<component>.<path>``; the
    arguments as :func:`resolve_components` takes them.

    Raises:
        AdapterMismatchError: what ``resolve_all`` raises, for every component, each named.
    """
    lora: dict[str, LoraModule] = {}
    weights: dict[str, WeightModule] = {}
    problems: list[str] = []
    for component, routed in groups.items():
        if not routed:
            continue
        head = component + "."
        part = dataclasses.replace(
            adapter,
            modules={k: m for k, m in routed if isinstance(m, LoraModule)},
            weights={k: m for k, m in routed if isinstance(m, WeightModule)},
        )
        own = [n[len(head) :] for n in names if n.startswith(head)]
        beside = [n[len(head) :] for n in others if n.startswith(head)]
        sizes = {n[len(head) :]: d for n, d in heads.items() if n.startswith(head)}
        bare = [n[len(head) :] for n in weightless if n.startswith(head)]
        read = [(n[len(head) :], why) for n, why in unwrapped if n.startswith(head)]
        wrappers = None if levels is None else [n[len(head) :] for n in levels if n.startswith(head)]
        naming = file_naming(adapter, [*own, *beside])  # the whole file's keys, this component's layers
        try:
            found, folded = resolve_all(part, own, skipped, beside, sizes, bare, read, naming, component, wrappers)
        except AdapterMismatchError as exc:
            problems.append(f"[{component}] " + message(exc))
            continue
        lora.update({head + n: m for n, m in found.items()})
        weights.update({head + n: w for n, w in folded.items()})
    if problems:
        raise AdapterMismatchError(lines(*problems))
    return lora, weights


def _t5_elsewhere(keys: list[str], components: tuple[str, ...], paths: list[str]) -> bool:
    """Whether the T5 modules among ``keys`` go to ``text_encoder_2``: the runtime has no
    ``text_encoder_3``, and its ``text_encoder_2`` has a module at one of their paths (a
    Flux.1 pipeline's T5; SDXL's ``text_encoder_2`` is a CLIP, with none of a T5's paths)."""
    if "text_encoder_3" in components or _T5_ELSEWHERE not in components:
        return False
    head = _T5_ELSEWHERE + "."
    held = {p[len(head) :].replace(".", "_") for p in paths if p.startswith(head)}
    return any(
        key[len(prefix) :].replace(".", "_") in held for key in keys for prefix in T5_PREFIXES if key.startswith(prefix)
    )


def _architectures(component: str, paths: list[str]) -> set[str]:
    """The architectures whose fingerprint module ``component`` has (:data:`_FINGERPRINTS`)."""
    head = component + "."
    own = [p[len(head) :] for p in paths if p.startswith(head)]
    return {arch for arch, pattern in _FINGERPRINTS.items() if any(re.search(pattern, p) for p in own)}


def _family(encoder: str) -> str | None:
    """The architecture of ComfyUI's text encoder ``encoder`` (its name), or None: unknown."""
    return next((arch for pattern, arch in _ENCODER_FAMILIES if re.match(pattern, encoder)), None)


def _comfyui_targets(
    keys: list[str], components: tuple[str, ...], paths: list[str]
) -> dict[str, tuple[str | None, str]]:
    """ComfyUI encoder name -> ``(component, why)`` for the ComfyUI text-encoder keys among
    ``keys``: the one component whose modules are of that encoder's architecture (Llama's
    ``embed_tokens``/``gate_proj`` are no CLIP's, whatever the pipeline calls them: a
    HunyuanVideo pipeline's CLIP is its ``text_encoder_2``), or, of several (SDXL's two CLIPs),
    the one SD3 holds it as; None, with the reason, where none or several fit, or the
    architecture is unknown."""
    out: dict[str, tuple[str | None, str]] = {}
    found = {m["encoder"] for m in map(COMFYUI_ENCODER.match, keys) if m is not None}
    if not found:
        return out
    archs = {c: _architectures(c, paths) for c in components}
    for encoder in sorted(found):
        family = _family(encoder)
        fits = [c for c in components if family in archs[c]]
        if family is None:
            out[encoder] = (None, f"ComfyUI's text encoder {encoder!r} is none lorahot knows the architecture of")
        elif family == "CLIP" and fits:
            out[encoder] = _clip_target(encoder, fits, paths)
        elif len(fits) == 1 or _SD3_PLACE.get(encoder) in fits:
            out[encoder] = (fits[0] if len(fits) == 1 else _SD3_PLACE[encoder], "")
        elif fits:
            out[encoder] = (
                None,
                f"several components are a {family}: {', '.join(fits)}, and none is where SD3 holds it",
            )
        else:
            out[encoder] = (None, f"no component of this runtime is a {family} (ComfyUI's {encoder!r} is one)")
    return out


def _clip_names(clips: Sequence[str], paths: Sequence[str]) -> dict[str, str]:
    """The CLIP components ``clips`` -> the ComfyUI name of each (:data:`_CLIP_NAMES`), as the
    model holding them names it: of two or more, ``text_encoder`` is ``clip_l`` and
    ``text_encoder_2`` is ``clip_g`` (SDXL's, SD3's and HiDream's places), the others none; a
    lone CLIP is named by its depth (:data:`_LONE_CLIP_DEPTHS`), ``clip_l`` unless it is as deep as
    an OpenCLIP-G or -H."""
    if len(clips) > 1:
        return {c: n for n, c in _SD3_PLACE.items() if c in clips and n in _CLIP_NAMES}
    head = clips[0] + "."
    layers = {int(m[1]) for p in paths if p.startswith(head) for m in [_CLIP_LAYER.search(p[len(head) :])] if m}
    return {clips[0]: _LONE_CLIP_DEPTHS.get(max(layers, default=-1) + 1, "clip_l")}


def _clip_target(encoder: str, clips: list[str], paths: Sequence[str]) -> tuple[str | None, str]:
    """``(component, why)`` for ComfyUI's CLIP ``encoder`` on a runtime whose CLIP components are
    ``clips`` (at least one): the one :func:`_clip_names` gives that name, as ComfyUI maps
    ``text_encoders.<name>.`` only onto a model that holds an encoder of that name; None, with the
    reason, where none has it: ComfyUI ignores those modules (a ``lora key not loaded`` warning),
    and on another CLIP of equal width they would load silently onto the wrong encoder."""
    names = _clip_names(clips, paths)
    held = [c for c, n in names.items() if n == encoder]
    if held:
        return held[0], ""
    if encoder not in _CLIP_NAMES:
        return (
            None,
            f"ComfyUI's text encoder {encoder!r} is a CLIP none of this runtime's is named (clip_l, clip_g, clip_h)",
        )
    if len(clips) > 1 and not names:
        return None, f"several components are a CLIP: {', '.join(clips)}, and none is where SD3 holds it"
    encoders = ", ".join(f"{c} (ComfyUI's {names[c]})" if c in names else c for c in clips)
    return None, (
        f"the file is for a model with ComfyUI's {encoder!r} encoder, and this runtime holds none: its CLIP "
        f"encoders are {encoders}; ComfyUI maps {encoder!r} only onto {_CLIP_PLACES[encoder]}, and ignores "
        f"these modules on other models"
    )


def _missing_message(
    source: str,
    missing: dict[str, list[str]],
    components: tuple[str, ...],
    encoders: Mapping[str, tuple[str | None, str]],
) -> str:
    rows = []
    t5_lines = 0
    for prefix, keys in missing.items():
        target = dict(ROUTES).get(prefix) if prefix else None
        wanted = target or " or ".join(DENOISER)
        which = f"prefix {shown(prefix, 200)}" if prefix else "no component prefix"
        encoder = COMFYUI_ENCODER.match(prefix)
        why = encoders[encoder["encoder"]][1] if encoder is not None else ""
        if encoder is not None and not why.startswith("no component of this runtime is a T5"):
            rows.append(f"{len(keys)} text-encoder module(s) with {which} (e.g. {keys[0]}): {why}")
            continue
        if prefix in T5_PREFIXES or encoder is not None:
            t5_lines += 1
            rows.append(
                f"{len(keys)} T5 text-encoder module(s) with {which} (e.g. {keys[0]}): they go to text_encoder_3 "
                f"(SD3's T5), which was not injected, or to a {_T5_ELSEWHERE} that holds their modules (Flux.1's "
                f"T5), which " + ("holds none of them" if _T5_ELSEWHERE in components else "was not injected")
            )
            continue
        rows.append(f"{len(keys)} module(s) with {which} (e.g. {keys[0]}) go to {wanted}, which was not injected")
    wanted_names = [
        dict(ROUTES).get(p) or " or ".join(DENOISER)
        for p in missing
        if p not in T5_PREFIXES and COMFYUI_ENCODER.match(p) is None
    ]
    example = " or ".join(f"{{..., '{c}': pipe.{c}}}" for c in wanted_names[0].split(" or ")) if wanted_names else ""
    if wanted_names:
        fix = f"Inject the missing component too (lorahot.inject({example}, ...))"
    elif t5_lines:
        fix = (
            "Inject the pipeline's T5 encoder too ({..., 'text_encoder_3': pipe.text_encoder_3} for SD3, "
            "{..., 'text_encoder_2': pipe.text_encoder_2} for Flux.1)"
        )
    else:
        fix = (
            "Inject the pipeline's text encoder that holds those modules, load the file on a pipeline that has "
            "that encoder"
        )
    return lines(
        format_problems(f"{source}: adapter modules for components this runtime lacks:", rows),
        f"This runtime has components {', '.join(components)}. {fix}, or load with strict=False to skip those modules.",
    )
