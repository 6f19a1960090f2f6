"""Images, volumes and the journaled operations that change them."""
