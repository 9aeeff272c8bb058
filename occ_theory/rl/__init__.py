"""RL: sampling, advantages, RL and MTP objectives, coefficient rules."""
