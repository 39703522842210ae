// SPDX-License-Identifier: GPL-2.0
/* vfs_path_lookup() declared in <linux/namei.h> (6.6+; exported on every matrix kernel) */
#include <linux/namei.h>
static __maybe_unused int dbd_probe(struct dentry *d, struct vfsmount *m, struct path *p)
{
	return vfs_path_lookup(d, m, "x", 0, p);
}
