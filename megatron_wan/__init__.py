"""megatron_wan: Reg-DPO training of Wan 2.1 video diffusion models on Megatron-Core."""

__version__ = "0.1.0"
