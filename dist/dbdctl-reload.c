// SPDX-License-Identifier: GPL-2.0
/*
 * dbdctl for the initramfs: only the two commands the persisted reload
 * scripts use (spec section 7), so early boot needs no Python.
 *
 *   dbdctl reload-snapshot    [-c <cache size>] <block device> <cow file> <minor>
 *   dbdctl reload-incremental [-c <cache size>] <block device> <cow file> <minor>
 *
 * The COW path is relative to the volume's mount point.  Exit status 0 on
 * success, 255 (like dbdctl) on any error, with the errno named on stderr.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/types.h>

#define __user
#include "../kernel/dattobd_uapi.h"

#define CTL_PATH "/dev/datto-ctl"

static int usage(void)
{
	fprintf(stderr,
		"usage: dbdctl reload-snapshot|reload-incremental [-c <cache size>] <block device> <cow file> <minor>\n");
	return 255;
}

static int parse_ulong(const char *s, unsigned long max, unsigned long *out)
{
	char *end;
	unsigned long v;

	if (!*s || *s == '-')
		return -1;
	errno = 0;
	v = strtoul(s, &end, 0);
	if (errno || *end || v > max)
		return -1;
	*out = v;
	return 0;
}

int main(int argc, char **argv)
{
	struct reload_params p;
	unsigned long minor, cache = 0;
	unsigned long req;
	int i = 2, fd;

	if (argc < 2)
		return usage();
	if (!strcmp(argv[1], "reload-snapshot"))
		req = IOCTL_RELOAD_SNAP;
	else if (!strcmp(argv[1], "reload-incremental"))
		req = IOCTL_RELOAD_INC;
	else
		return usage();
	if (i < argc && !strcmp(argv[i], "-c")) {
		if (i + 1 >= argc || parse_ulong(argv[i + 1], (unsigned long)-1, &cache))
			return usage();
		i += 2;
	}
	if (argc - i != 3 || parse_ulong(argv[i + 2], 255, &minor))
		return usage();
	memset(&p, 0, sizeof(p));
	p.bdev = argv[i];
	p.cow = argv[i + 1];
	p.minor = (unsigned int)minor;
	p.cache_size = cache;

	fd = open(CTL_PATH, O_RDONLY);
	if (fd < 0) {
		fprintf(stderr, "dbdctl: cannot open %s: %s (errno %d); is the dattobd module loaded?\n",
			CTL_PATH, strerror(errno), errno);
		return 255;
	}
	if (ioctl(fd, req, &p)) {
		int e = errno;

		fprintf(stderr, "dbdctl: %s of %s (cow %s) on minor %lu failed: %s (errno %d)\n",
			argv[1], p.bdev, p.cow, minor, strerror(e), e);
		close(fd);
		return 255;
	}
	close(fd);
	return 0;
}
