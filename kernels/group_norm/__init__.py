"""GroupNorm + SiLU over (N, C, *spatial): the VAE's normalisation, one op."""
