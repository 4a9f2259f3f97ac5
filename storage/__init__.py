"""Message and subscription stores behind one interface (see ``storage.base``)."""
