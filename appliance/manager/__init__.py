"""The board's guest manager: sites, their versions in the store, the Xen guests that serve them, and the
blue-green switch. Standard library only: it runs on the board with the image's python3, and the host imports
the same manifest validator and name rules.
"""
