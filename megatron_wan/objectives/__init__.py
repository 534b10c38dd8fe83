"""Training objectives: Wan's rectified flow, and SFT / DPO / Reg-DPO on top of it."""
