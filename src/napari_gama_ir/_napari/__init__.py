"""napari plugin: Restore widget and sample data. Only this package imports napari and Qt."""
