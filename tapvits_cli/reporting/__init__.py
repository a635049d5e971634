"""What tapvits shows about the files it wrote: ``inspect``'s documents and their text view, ``report``'s HTML page.

Pure presentation over the artifact readers: nothing here writes an artifact or changes
what a stage computes.
"""
