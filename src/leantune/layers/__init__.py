"""Building blocks that methods compose: branches added to existing modules, and modules methods own.

``lora``       the low-rank branch ``(alpha / r) * B(A(dropout(x)))``
``adapter``    the bottleneck adapter ``up(act(down(h)))`` with pluggable projections (Linear, PHM, generated)
``phm``        the parameterised hypercomplex multiplication layer (Compacter's projections)
``prefix``     prepending tokens to an input (a soft prompt and a visual prefix are the same operation)
``attention``  multi-head (cross-)attention through ``scaled_dot_product_attention``
``pooling``    the masked mean of a token sequence (answer heads, frozen-feature baselines)
"""
