"""``rp2k serve``: a trained checkpoint (and a SKU gallery that grows while serving) behind
HTTP on Ray Serve. :mod:`.requests` checks requests, :mod:`.model` answers them, :mod:`.app`
is the Serve deployment, :mod:`.command` the ``rp2k serve`` parser."""
