"""The spawner helper: forked before trio starts, it clones sandboxed builders."""
