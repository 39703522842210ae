// SPDX-License-Identifier: GPL-2.0
/* VFS helpers take struct mnt_idmap * (6.3+) */
#include <linux/fs.h>
#include <linux/mount.h>
static __maybe_unused int dbd_probe(struct file *f, struct inode *dir, struct dentry *d) {
	return vfs_unlink(file_mnt_idmap(f), dir, d, NULL);
}
