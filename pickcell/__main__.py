from pickcell.cli import main

raise SystemExit(main())
