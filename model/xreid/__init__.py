"""X-ReID: CLIP ViT with cross-modality prototypes (CPC) and multi-granularity interaction (MII)."""

from vvireid.model.xreid.model import CIIOutput, XReID, XReIDOutput

__all__ = ["CIIOutput", "XReID", "XReIDOutput"]
