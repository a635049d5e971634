"""The artifact protocol in code: the only package that reads or writes files.

Import the submodule you need (``artifacts.model``, ``artifacts.kinds``); this
package's import stays free of torch so the CLI starts fast.
"""
