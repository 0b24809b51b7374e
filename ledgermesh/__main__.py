from ledgermesh.cli import main

raise SystemExit(main())
