"""Explanations: captum attributions, layer Grad-CAM, SLIC superpixel confidence, shared targets."""
