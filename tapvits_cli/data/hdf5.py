"""What an HDF5 file must be before tapvits reads a value from it: its data its own, and (for artifacts) all stored.

HDF5 lets a file borrow data from elsewhere: an external link resolves a name in another
file, a dataset with external storage reads its values from any raw file (a FIFO hangs the
reader forever), and a virtual dataset maps other files' datasets, filling what is missing
with zeros. A file that borrows is not what was hashed, copied or validated: the same
bytes mean other data on another machine, or after the other file changes. tapvits never
writes such objects, so its readers refuse them (:func:`borrowed_data`), artifacts
(exit 3) and datasets (exit 2) alike. Soft links stay inside the file and are allowed.
Artifacts must also store every value they declare (:func:`unstored_values`), so that a
file's size bounds what reading it costs.
"""

from __future__ import annotations

from typing import Any


def borrowed_data(handle: Any) -> str | None:
    """What in an open ``h5py.File`` takes its data from outside the file, in words; None when nothing does.

    Walks every link reachable through hard links (HDF5's own link iteration, which never
    follows soft or external links, so nothing outside is opened on the way).
    """
    import h5py

    found: list[str] = []

    def visit(name: str, link: Any) -> bool | None:
        if isinstance(link, h5py.ExternalLink):
            found.append(f"'{name}' is an external link (to '{link.path}' in {link.filename!r})")
        elif isinstance(link, h5py.HardLink):
            item = handle[name]
            if isinstance(item, h5py.Dataset):
                if item.is_virtual:
                    found.append(f"'{name}' is a virtual dataset (its data is in other files)")
                elif item.external:
                    found.append(f"'{name}' stores its data in another file ({item.external[0][0]!r})")
        return True if found else None   # a value other than None stops the walk

    handle.visititems_links(visit)
    return found[0] if found else None


def unstored_values(handle: Any) -> str | None:
    """What in an open ``h5py.File`` declares more values than the file stores, in words; None when nothing does.

    HDF5 stores nothing for chunks never written and reads them back as the fill value, so a
    12 KB file can declare a column of 10¹¹ rows, which a reader would allocate (745 GiB)
    before any check on the values. A dataset that is stored as it is (no compression or
    other filter) and has every chunk on disk occupies at least its declared bytes, so the
    file's own size bounds what a reader of it allocates and reads: the rule of artifacts,
    which tapvits writes that way (datasets it did not write, such as a user's compressed
    image files, are not held to it).
    """
    import h5py

    found: list[str] = []

    def visit(name: str, item: Any) -> bool | None:
        if isinstance(item, h5py.Dataset):
            if item.id.get_create_plist().get_nfilters():
                found.append(f"'{name}' is compressed or filtered (values are stored as they are)")
            elif item.id.get_storage_size() < item.size * item.dtype.itemsize:
                found.append(f"'{name}' declares {item.size} values but the file does not store them all")
        return True if found else None

    handle.visititems(visit)
    return found[0] if found else None
