"""bbf_rt.export: ONNX, TensorRT and AOTInductor artifacts of the BBF denoiser (and the VAE), cached
under names that carry everything that changes them. See docs/export.md."""
from bbf_rt.export.api import export_denoiser, export_vae, load_artifact
from bbf_rt.export.cache import Artifact, ArtifactCache, default_cache_dir

__all__ = ["Artifact", "ArtifactCache", "default_cache_dir", "export_denoiser", "export_vae", "load_artifact"]
