"""medtrust: trustworthy medical-imaging AI experiments."""
