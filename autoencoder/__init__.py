"""The VQ-f4 autoencoder (taming / LDM layout): encoder, decoder, quantizer and training losses."""
