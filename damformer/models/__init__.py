"""Networks: MiT encoder, decoders, U-TAE, DTF fusion, DAM-Former and the ablation factory."""
