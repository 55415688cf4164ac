"""Where to pick, how sure we are, and learning from outcomes.

Pure computation: no sockets, no PyBullet. Imports none of pickcell's other packages.
"""
