"""ldetok: a research workbench for latent denoising tokenizers (l-DeTok).

Reference: Yang, Li, Fan, Tian, Wang, "Latent Denoising Makes Good Tokenizers", ICLR 2026.
"""

__version__ = "0.1.0"
