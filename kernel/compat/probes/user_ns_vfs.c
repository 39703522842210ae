// SPDX-License-Identifier: GPL-2.0
/* VFS helpers take struct user_namespace * (5.12 .. 6.2) */
#include <linux/fs.h>
#include <linux/mount.h>
static __maybe_unused int dbd_probe(struct file *f, struct inode *dir, struct dentry *d) {
	return vfs_unlink(file_mnt_user_ns(f), dir, d, NULL);
}
